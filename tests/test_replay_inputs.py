"""A failing parity case can be replayed (issue 19, item 10): ``validate`` / ``export``
``--save-inputs FILE.npz`` write every tensor fed, per case; ``validate --load-inputs`` runs
exactly those cases (their shapes, their values), for plain and decode graphs; a file that is
not such a save is a one-line error and nothing is written."""

from __future__ import annotations

import json

import numpy as np
import pytest

import attn2onnx
from attn2onnx import cli
from attn2onnx.io_spec import random_inputs, specs_from_onnx
from attn2onnx.models.decode import export_decode
from attn2onnx.sources import from_module


def tiny_lm():
    config = attn2onnx.ModelConfig(family="lm", variant="mha", layers=1, d_model=32, heads=4, max_len=64)
    return attn2onnx.build_model(config).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[str, str, str]:
    """A tiny LM's checkpoint, its ONNX export and its decode graph."""
    folder = tmp_path_factory.mktemp("replay")
    model = tiny_lm()
    attn2onnx.save(model, folder / "lm.pt")
    source = from_module(model)
    attn2onnx.export(
        model, source.example_inputs(2, 8), folder / "lm.onnx", specs=source.specs, output_names=source.output_names
    )
    export_decode(model, folder / "lm.decode.onnx")
    return str(folder / "lm.pt"), str(folder / "lm.onnx"), str(folder / "lm.decode.onnx")


def _cli(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        return int(e.code)


def _validate(capsys, model: str, ckpt: str, *flags: str) -> dict:
    assert _cli(["validate", model, "--reference", ckpt, "--json", *flags]) == 0
    return json.loads(capsys.readouterr().out)


def test_save_inputs_holds_every_fed_tensor_per_case(exported, tmp_path, capsys):
    ckpt, path, _ = exported
    saved = tmp_path / "in.npz"
    _validate(capsys, path, ckpt, "--shapes", "1x5,2x9", "--seed", "7", "--save-inputs", str(saved))
    with np.load(saved) as data:
        arrays = dict(data)
    specs = specs_from_onnx(attn2onnx.onnx_io.load_onnx(path))
    assert sorted(arrays) == sorted(f"case{i}/{s.name}" for i in range(2) for s in specs), sorted(arrays)
    for i, (batch, seq) in enumerate([(1, 5), (2, 9)]):
        for name, value in random_inputs(specs, batch, seq, seed=7 + i).items():
            np.testing.assert_array_equal(arrays[f"case{i}/{name}"], value)
            assert arrays[f"case{i}/{name}"].dtype == value.dtype


def test_load_inputs_runs_exactly_those_cases(exported, tmp_path, capsys):
    ckpt, path, _ = exported
    saved, edited = tmp_path / "in.npz", tmp_path / "edited.npz"
    first = _validate(capsys, path, ckpt, "--shapes", "1x5,2x9,3x4", "--save-inputs", str(saved))
    replay = _validate(capsys, path, ckpt, "--load-inputs", str(saved))
    assert replay["comparisons"] == first["comparisons"], (replay, first)
    with np.load(saved) as data:  # keep case 1 only, as case 0
        np.savez(edited, **{k.replace("case1/", "case0/"): v for k, v in data.items() if k.startswith("case1/")})
    replay = _validate(capsys, path, ckpt, "--load-inputs", str(edited))
    assert replay["comparisons"] == first["comparisons"][1:2], replay


def test_decode_cases_replay(exported, tmp_path, capsys):
    ckpt, _, decode = exported
    saved = tmp_path / "decode.npz"
    first = _validate(
        capsys, decode, ckpt, "--decode", "--shapes", "1x3,2x4", "--steps", "2", "--save-inputs", str(saved)
    )
    with np.load(saved) as data:
        arrays = dict(data)
    names = ("input_ids", "attention_mask", "position_ids", "prompt")
    assert sorted(arrays) == sorted(f"case{i}/{n}" for i in range(2) for n in names), sorted(arrays)
    assert arrays["case1/input_ids"].shape == (2, 6) and int(arrays["case1/prompt"]) == 4
    replay = _validate(capsys, decode, ckpt, "--decode", "--load-inputs", str(saved))
    assert [c["shape"] for c in replay["comparisons"]] == [[1, 3, 2], [2, 4, 2]]
    assert replay["comparisons"] == first["comparisons"], (replay, first)


def test_export_saves_its_check_inputs_for_validate(exported, tmp_path, capsys):
    ckpt, _, _ = exported
    out, saved = tmp_path / "m.onnx", tmp_path / "check.npz"
    flags = ["--atol", "1e-3", "--check-error-stat", "max", "--save-inputs", str(saved)]
    assert _cli(["export", ckpt, "-o", str(out), "--batch", "2", "--seq-len", "6", *flags]) == 0
    checks = [line for line in capsys.readouterr().out.splitlines() if line.startswith("check ")]
    assert len(checks) == 2 and all(
        line.endswith(" (fp32 tolerance: atol 0.001, rtol 1e-05, max error) ok") for line in checks
    )
    replay = _validate(capsys, str(out), ckpt, "--load-inputs", str(saved))
    assert [c["shape"] for c in replay["comparisons"]] == [[2, 6], [3, 4]], replay


def _write(path, arrays: dict) -> str:
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize(
    "case, match",
    [
        ("text", "not a readable .npz"),
        ("foreign", "array 'ids' is not an input saved by --save-inputs"),
        ("missing", "saved case 0: missing input(s): key_padding_mask"),
        ("dtype", "saved case 0: input 'input_ids' must be int64"),
        ("shapes", "drop --shapes"),
        ("onto_model", "same file as input"),
        ("decode_positions", "saved case 0: position_ids must be the padded index"),
    ],
)
def test_bad_saved_inputs_are_one_line_errors(exported, tmp_path, capsys, case, match):
    ckpt, path, decode = exported
    ids = np.zeros((1, 4), np.int64)
    mask = np.ones((1, 4), bool)
    model, flags = path, []
    if case == "text":
        (tmp_path / "in.npz").write_text("not an archive")
        flags = ["--load-inputs", str(tmp_path / "in.npz")]
    elif case == "foreign":
        flags = ["--load-inputs", _write(tmp_path / "in.npz", {"ids": ids})]
    elif case == "missing":
        flags = ["--load-inputs", _write(tmp_path / "in.npz", {"case0/input_ids": ids})]
    elif case == "dtype":
        arrays = {"case0/input_ids": ids.astype(np.int32), "case0/key_padding_mask": mask}
        flags = ["--load-inputs", _write(tmp_path / "in.npz", arrays)]
    elif case == "shapes":
        arrays = {"case0/input_ids": ids, "case0/key_padding_mask": mask}
        flags = ["--load-inputs", _write(tmp_path / "in.npz", arrays), "--shapes", "1x4"]
    elif case == "onto_model":
        flags = ["--save-inputs", path]
    else:
        arrays = {"case0/input_ids": ids, "case0/attention_mask": ids + 1, "case0/position_ids": ids}
        model, flags = decode, ["--decode", "--load-inputs", _write(tmp_path / "in.npz", {**arrays, "case0/prompt": 2})]
    before = sorted(p.name for p in tmp_path.iterdir())
    save = [] if case == "onto_model" else ["--save-inputs", str(tmp_path / "out.npz")]
    assert _cli(["validate", model, "--reference", ckpt, *flags, *save]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("attn2onnx: error: ") and match in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
