"""The ``attn2onnx`` command: ``variants`` and ``new``, dispatch, and one-line errors.

Two tests run the real command in a subprocess (the installed entry point, ``python -m
attn2onnx``); the rest call ``attn2onnx.cli.main`` in-process, which is the same code path."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys

import pytest
import torch

import attn2onnx
from attn2onnx import cli
from attn2onnx.commands.new import parse_options, parse_value
from attn2onnx.variants import VARIANTS


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m attn2onnx ARGS`` (each run pays torch's import: keep these few)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("ATTN2ONNX_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "attn2onnx", *args], capture_output=True, text=True, env=env, timeout=120
    )


def assert_one_line_error(stderr: str, match: str) -> None:
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("attn2onnx: error: "), stderr
    assert match in lines[0], stderr


def call(capsys, *args: str) -> tuple[int, str, str]:
    """main() in-process: (exit status, stdout, stderr); argparse's SystemExit becomes a status."""
    try:
        status = cli.main(list(args))
    except SystemExit as exit_:
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


# --- subprocess: the real command -----------------------------------------------------------
def test_new_through_the_entry_point(tmp_path):
    exe = shutil.which("attn2onnx")
    command = [exe] if exe else [sys.executable, "-m", "attn2onnx.cli"]
    out = tmp_path / "lm.pt"
    result = subprocess.run(
        [
            *command,
            "new",
            "dcmha",
            "-o",
            str(out),
            "--layers",
            "3",
            "--d-model",
            "32",
            "--heads",
            "4",
            "--max-len",
            "16",
            "--seed",
            "7",
            "--option",
            "rope=true",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and "CausalLM" in result.stdout and result.stderr == ""
    model = attn2onnx.load(out)
    c = model.config
    assert (c.family, c.variant, c.layers, c.d_model, c.heads, c.max_len, c.seed) == ("lm", "dcmha", 3, 32, 4, 16, 7)
    assert c.options == {"rope": True} and model.pos is None
    for name in ("dw1", "qkw", "dd"):  # a fresh DCMHA model composes heads: dynamic weights non-zero
        weight = getattr(model.trunk.blocks[0].attn, name)
        assert weight.abs().sum() > 0, name


def test_errors_are_one_line_with_status_2_and_no_file(tmp_path):
    out = tmp_path / "m.pt"
    result = run_cli("new", "imhsa", "-o", str(out), "--family", "lm")
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "cannot be causal")
    assert result.stdout == "" and os.listdir(tmp_path) == []


# --- in-process -----------------------------------------------------------------------------
def test_variants_command_lists_every_variant(capsys):
    status, out, err = call(capsys, "variants")
    assert status == 0 and err == "", err
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["variant", "paper", "causal"]
    for name, info in VARIANTS.items():
        row = next(line for line in lines if line.split()[0] == name)
        assert info.params in row and ", ".join(info.families) in row and info.paper in row
        assert (" yes " if info.causal else " no ") in row


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_new_every_variant_in_its_default_family(tmp_path, capsys, variant):
    out = tmp_path / "m.pt"
    status, stdout, stderr = call(
        capsys,
        "new",
        variant,
        "-o",
        str(out),
        "--d-model",
        "16",
        "--heads",
        "2",
        "--max-len",
        "16",
        "--vocab-size",
        "11",
    )
    assert status == 0 and stderr == "", stderr
    model = attn2onnx.load(out)
    expected = "lm" if VARIANTS[variant].causal else "encoder"
    assert model.config.family == expected and f"({expected})" in stdout
    x = torch.randint(0, 11, (2, 5))
    assert torch.isfinite(model(x)).all()


def test_new_with_every_model_option(tmp_path, capsys):
    out = tmp_path / "enc.pt"
    status, _, err = call(
        capsys,
        "new",
        "imhsa",
        "-o",
        str(out),
        "--family",
        "encoder",
        "--image-size",
        "8",
        "--patch-size",
        "2",
        "--channels",
        "1",
        "--num-classes",
        "5",
        "--mlp",
        "swiglu",
        "--mlp-hidden",
        "24",
        "--max-len",
        "17",
        "--d-model",
        "16",
        "--heads",
        "2",
    )
    assert status == 0, err
    c = attn2onnx.load(out).config
    assert (c.image_size, c.patch_size, c.channels, c.num_classes, c.mlp, c.mlp_hidden) == (8, 2, 1, 5, "swiglu", 24)
    out = tmp_path / "reuse.pt"
    status, _, err = call(
        capsys,
        "new",
        "reuse",
        "-o",
        str(out),
        "--layers",
        "4",
        "--reuse-schedule",
        "0,2,4,1",
        "--untied",
        "--family",
        "lm",
    )
    assert status == 0, err
    c = attn2onnx.load(out).config
    assert c.reuse_schedule == [0, 2, 4, 1] and not c.tie_embeddings
    out = tmp_path / "layer.pt"
    status, _, err = call(capsys, "new", "super", "-o", str(out), "--family", "layer", "--option", "causal=true")
    assert status == 0, err
    assert attn2onnx.load(out).config.causal


@pytest.mark.parametrize(
    "args,match",
    [
        (["new", "imhsa", "--family", "lm"], "variant 'imhsa' cannot be causal"),
        (["new", "bn-sh", "--family", "lm"], "variant 'bn-sh' cannot be causal"),
        (["new", "sh", "--family", "layer", "--option", "causal=true"], "variant 'sh' cannot be causal"),
        (["new", "nope"], "unknown variant 'nope'; known: mha"),
        (["new", "mha", "--option", "nope=1"], "has no option(s) nope"),
        (["new", "dcmha", "--option", "rope=maybe"], "'rope' of variant 'dcmha' takes bool"),
        (["new", "sh", "--option", "sh_factors=[1,x]"], "'sh_factors' of variant 'sh' takes tuple[int, ...]"),
        (["new", "imhsa", "--option", "mix=sideways"], "mix must be one of"),
        (["new", "mha", "--option", "d_model=8"], "set the model's d_model"),
        (["new", "mha", "--option", "causal"], "--option takes KEY=VALUE"),
        (["new", "mha", "--option", "bias=true", "--option", "bias=false"], "given twice"),
        (["new", "mha", "--heads", "5"], "not divisible"),
        (["new", "mha", "--layers", "0"], "argument --layers: must be a positive integer, got 0"),
        (["new", "mha", "--family", "layer", "--layers", "2"], "one bare attention layer"),
        (["new", "mha", "--image-size", "8"], "both patch_size and image_size"),
        (["new", "mha", "--family", "encoder", "--image-size", "64", "--patch-size", "4"], "more than max_len"),
        (["new", "reuse", "--reuse-schedule", "1,0"], "must start with 0"),
        (["new", "reuse", "--reuse-schedule", "0,x"], "comma-separated integers"),
        (["new", "mha", "--reuse-schedule", "0,0"], "reuse_schedule applies to"),
        (["new", "mha", "--layers", "two"], "invalid int value: 'two'"),
        (["new", "mha", "--family", "vision"], "invalid choice: 'vision'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_new_errors(tmp_path, capsys, args, match):
    if args[0] == "new":
        args = [*args[:2], "-o", str(tmp_path / "m.pt"), *args[2:]]
    status, out, err = call(capsys, *args)
    assert status == 2 and out == ""
    assert_one_line_error(err, match)
    assert os.listdir(tmp_path) == []


def test_output_path_errors(tmp_path, capsys):
    status, _, err = call(capsys, "new", "mha", "-o", str(tmp_path / "missing" / "m.pt"))
    assert status == 2
    assert_one_line_error(err, "does not exist")
    status, _, err = call(capsys, "new", "mha", "-o", str(tmp_path))
    assert status == 2
    assert_one_line_error(err, "is a folder")
    status, _, err = call(capsys, "new", "mha")
    assert status == 2
    assert_one_line_error(err, "-o/--output")
    assert os.listdir(tmp_path) == []


def test_bugs_keep_their_traceback(monkeypatch):
    """Only user errors become one line: an unexpected exception propagates."""
    module = importlib.import_module("attn2onnx.commands.variants")
    monkeypatch.setattr(module, "run", lambda args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        cli.main(["variants"])


def test_debug_env_shows_the_traceback(monkeypatch):
    monkeypatch.setenv("ATTN2ONNX_DEBUG", "1")
    with pytest.raises(attn2onnx.VariantError):
        cli.main(["new", "nope", "-o", "x.pt"])


def test_no_command_prints_help(capsys):
    status, out, _ = call(capsys)
    assert status == 2 and "variants" in out and "new" in out


def test_command_modules_follow_the_interface():
    for name, module_name in cli.COMMANDS.items():
        module = importlib.import_module(f"attn2onnx.commands.{module_name}")
        assert isinstance(module.HELP, str) and callable(module.configure) and callable(module.run), name


def test_option_values():
    assert [parse_value(v) for v in ("true", "False", "none", "3", "0.5", "[1, 2]", "1,2", '"x"', "tanh")] == [
        True,
        False,
        None,
        3,
        0.5,
        [1, 2],
        (1, 2),
        "x",
        "tanh",
    ]
    assert parse_options(["rope=true", "rope-base=500", "gelu_approx=tanh"]) == {
        "rope": True,
        "rope_base": 500,
        "gelu_approx": "tanh",
    }


@pytest.mark.parametrize("variant,family", [(v, f) for v, info in VARIANTS.items() for f in info.families])
def test_new_every_variant_in_every_family_it_fits(tmp_path, capsys, variant, family):
    out = tmp_path / "m.pt"
    status, _, stderr = call(
        capsys,
        "new",
        variant,
        "-o",
        str(out),
        "--family",
        family,
        "--d-model",
        "16",
        "--heads",
        "2",
        "--max-len",
        "16",
        "--vocab-size",
        "11",
    )
    assert status == 0, stderr
    model = attn2onnx.load(out)
    assert (model.config.family, model.config.variant) == (family, variant)
