"""Parity rows report the shapes that ran (issue 19, item 9).

A graph exported with fixed sizes (``export --static``, a static torch.export program) runs only
at its own shape, whatever shape was asked for: its check and ``validate`` must run it there and
say so, and a shape it cannot take is a one-line error (exit 2), never a PASS row for a shape
that never ran. ``validate --decode --steps N`` with no room for a prompt is an error too.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import onnx
import pytest
import torch

import attn2onnx
from attn2onnx.errors import UsageError
from attn2onnx.io_spec import InputSpec
from attn2onnx.models import ModelConfig, build_model
from attn2onnx.validate import decode_cases
from test_cli_basic import assert_one_line_error, call


@pytest.fixture(scope="module")
def static_lm(tmp_path_factory):
    """A small LM checkpoint and its ``export --static --batch 1 --seq-len 12``."""
    folder = tmp_path_factory.mktemp("static")
    ckpt = folder / "lm.pt"
    attn2onnx.save(build_model(ModelConfig(family="lm", variant="mha", d_model=16, heads=2, max_len=24)), ckpt)
    status = attn2onnx.cli.main(
        ["export", str(ckpt), "-o", str(folder / "lm.onnx"), "--static", "--batch", "1", "--seq-len", "12"]
    )
    assert status == 0
    return ckpt, folder / "lm.onnx"


def test_static_graph_validates_at_its_own_shape(static_lm, capsys):
    ckpt, model = static_lm
    status, out, err = call(capsys, "validate", str(model), "--reference", str(ckpt), "--json")
    assert status == 0, err
    result = json.loads(out)
    assert [c["shape"] for c in result["comparisons"]] == [[1, 12]]
    assert result["fixed"] == {"batch": 1, "seq": 12}
    status, out, err = call(capsys, "validate", str(model), "--reference", str(ckpt))
    assert status == 0, err
    assert "fixed shape 1x12" in out
    assert "1x5 " not in out and "2x16" not in out and "3x33" not in out


def test_static_graph_refuses_a_shape_it_cannot_take(static_lm, capsys):
    ckpt, model = static_lm
    status, out, err = call(capsys, "validate", str(model), "--reference", str(ckpt), "--shapes", "1x12,2x16")
    assert status == 2, (out, err)
    assert_one_line_error(err, "fixed shape 1x12")
    status, out, err = call(capsys, "validate", str(model), "--reference", str(ckpt), "--shapes", "1x12")
    assert status == 0, err


def test_graph_fixed_without_our_metadata_is_checked_at_its_shape(static_lm, capsys, tmp_path):
    """A static graph exported elsewhere (no attn2onnx metadata: the reference's dynamic specs
    are the inputs) still runs only at the sizes its graph fixes."""
    ckpt, model = static_lm
    proto = onnx.load(str(model))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "bare.onnx"))
    status, out, err = call(capsys, "validate", str(tmp_path / "bare.onnx"), "--reference", str(ckpt), "--json")
    assert status == 0, err
    result = json.loads(out)
    assert [c["shape"] for c in result["comparisons"]] == [[1, 12]] and result["fixed"] == {"batch": 1, "seq": 12}


def _program(tmp_path, batch: int, seq: int, dynamic: bool):
    """A tiny layer over x [batch, seq, 8] as a .pt2 program (static unless ``dynamic``)."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh()).eval()
    x = torch.randn(batch, seq, 8)
    shapes = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("seq", max=64)},) if dynamic else None
    path = tmp_path / "p.pt2"
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes=shapes), path)
    return path


def test_program_export_checks_the_shapes_it_takes(capsys, tmp_path):
    """The check after exporting a static program runs the program's shape only (not the
    --batch/--seq-len defaults, nor a second shape) and says it is fixed; a dynamic one's
    runs both shapes it was asked for."""
    program = _program(tmp_path, 3, 9, dynamic=False)
    status, out, err = call(capsys, "export", str(program), "-o", str(tmp_path / "p.onnx"))
    assert status == 0, err
    checks = [line for line in out.splitlines() if line.startswith("check ")]
    assert len(checks) == 1 and "batch=3 seq=9" in checks[0] and checks[0].endswith("ok"), out
    assert "fixed shape 3x9" in out
    program = _program(tmp_path, 3, 9, dynamic=True)
    status, out, err = call(capsys, "export", str(program), "-o", str(tmp_path / "p.onnx"), "--seq-len", "6")
    assert status == 0, err
    checks = [line for line in out.splitlines() if line.startswith("check ")]
    assert [c.split(":")[0] for c in checks] == ["check ort at batch=2 seq=6", "check ort at batch=3 seq=4"]
    assert "fixed" not in out


def test_static_program_refuses_another_export_shape(capsys, tmp_path):
    program = _program(tmp_path, 3, 9, dynamic=False)
    before = sorted(p.name for p in tmp_path.iterdir())
    status, out, err = call(capsys, "export", str(program), "-o", str(tmp_path / "p.onnx"), "--batch", "2")
    assert status == 2, (out, err)
    assert_one_line_error(err, "fixed shape 3x9")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_runnable_shapes_keeps_dynamic_dims_and_fixes_the_others():
    from attn2onnx.validate import runnable_shapes

    ids = InputSpec("ids", (1, "seq"), "ids", 10)
    shapes, fixed = runnable_shapes([ids], [(1, 5), (2, 16), (3, 16)], requested=False)
    assert shapes == [(1, 5), (1, 16)] and fixed == {"batch": 1}
    with pytest.raises(UsageError, match="fixed batch 1"):
        runnable_shapes([ids], [(2, 16)], requested=True)
    image = InputSpec("pixels", ("batch", 3, 8, 8), "float")
    shapes, fixed = runnable_shapes([image], [(1, 5), (1, 16), (2, 16)], requested=True)
    assert shapes == [(1, 5), (2, 16)] and fixed == {}


def test_decode_steps_past_max_len_is_a_usage_error():
    meta = SimpleNamespace(caches=(SimpleNamespace(limit=None),), max_len=8)  # a decode graph's metadata
    assert decode_cases(meta, 7) == [(1, 1), (3, 1)]
    for steps in (8, 9, 100):
        with pytest.raises(UsageError, match="max_len 8"):
            decode_cases(meta, steps)
