"""Arguments that are not UTF-8 (issue 19, item 7): a file name or ``--prompt`` holding bytes no
UTF-8 decoder takes reaches Python as lone surrogates (PEP 383), which ONNX's checker, ONNX
Runtime and the prompt's UTF-8 encoding turned into tracebacks. Every command now refuses such
an argument in one line, showing its bytes escaped, before anything is read or written; the
API's session() does the same for a model path."""

from __future__ import annotations

import os

import pytest

from attn2onnx.cli import error_line
from attn2onnx.errors import UsageError
from attn2onnx.runtime.sessions import session
from test_cli_basic import assert_one_line_error, call
from test_cli_errors import save_onnx


@pytest.fixture
def folder(tmp_path):
    """A folder whose name holds the byte 0xff, with a model m<0xfe>.onnx in it."""
    path = tmp_path / os.fsdecode(b"dir\xff")
    path.mkdir()
    save_onnx(path / os.fsdecode(b"m\xfe.onnx"), "Identity", [1, "seq"])
    return path


@pytest.mark.parametrize(
    "command, label",
    [
        (["run"], "MODEL.onnx"),
        (["optimize", "-o", "out.onnx"], "IN.onnx"),
        (["generate", "--prompt-ids", "1"], "MODEL.onnx"),
    ],
)
def test_a_model_path_that_is_not_utf8_is_one_line(capsys, folder, command, label):
    model = str(folder / os.fsdecode(b"m\xfe.onnx"))
    before = sorted(os.listdir(folder))
    status, out, err = call(capsys, command[0], model, *command[1:])
    assert status == 2, (out, err)
    assert_one_line_error(err, f"argument {label}: '" + str(folder.parent) + r"/dir\xff/m\xfe.onnx' is not valid UTF-8")
    assert sorted(os.listdir(folder)) == before


def test_an_output_path_that_is_not_utf8_is_refused_before_writing(capsys, tmp_path):
    model = save_onnx(tmp_path / "m.onnx", "Identity", [1, "seq"])
    output = str(tmp_path / os.fsdecode(b"out\xfd.npz"))
    status, out, err = call(capsys, "run", model, "-o", output)
    assert status == 2, (out, err)
    assert_one_line_error(err, r"argument --output: '" + str(tmp_path) + r"/out\xfd.npz' is not valid UTF-8")
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_a_prompt_that_is_not_utf8_is_one_line(capsys, tmp_path):
    model = save_onnx(tmp_path / "m.onnx", "Identity", [1, "seq"])
    status, out, err = call(capsys, "generate", model, "--prompt", os.fsdecode(b"caf\xe9"))
    assert status == 2, (out, err)
    assert_one_line_error(err, r"argument --prompt: 'caf\xe9' is not valid UTF-8")


def test_session_refuses_a_model_path_that_is_not_utf8(folder):
    with pytest.raises(UsageError, match=r"model path '.*/dir\\xff/m\\xfe.onnx' is not valid UTF-8"):
        session(folder / os.fsdecode(b"m\xfe.onnx"))


@pytest.mark.parametrize("name, shown", [(os.fsdecode(b"a\xff"), r"a\xff"), ("a\ud800", r"a\ud800")])
def test_error_lines_show_such_paths_escaped(name, shown):
    line = error_line(FileNotFoundError(2, "No such file or directory", name))
    assert line == f"No such file or directory: {shown}"
    line.encode("utf-8")  # printable on a strict UTF-8 stream
