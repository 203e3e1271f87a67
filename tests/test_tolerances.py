"""Tolerances visible and settable (issue 19, item 10): every verdict prints and reports the rule
it was judged by (atol / rtol per dtype, the error statistic); --atol / --rtol override the
dtype's defaults; --check-error-stat judges each output on Polygraphy's statistic (elemwise,
max, mean, median, as CompareFunc.simple defines them)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import attn2onnx
from attn2onnx import cli
from attn2onnx.errors import UsageError
from attn2onnx.sources import from_module
from attn2onnx.tolerances import Tolerance, judge, tolerance

SHAPES = "1x5,2x9"


def tiny_lm(seed: int = 0):
    config = attn2onnx.ModelConfig(family="lm", variant="mha", layers=1, d_model=32, heads=4, max_len=64, seed=seed)
    return attn2onnx.build_model(config).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[str, str, str]:
    """A tiny LM exported to ONNX, its checkpoint, and a checkpoint of other weights."""
    folder = tmp_path_factory.mktemp("tolerances")
    model = tiny_lm()
    attn2onnx.save(model, folder / "lm.pt")
    attn2onnx.save(tiny_lm(seed=1), folder / "other.pt")
    source = from_module(model)
    attn2onnx.export(
        model, source.example_inputs(2, 8), folder / "lm.onnx", specs=source.specs, output_names=source.output_names
    )
    return str(folder / "lm.onnx"), str(folder / "lm.pt"), str(folder / "other.pt")


def _cli(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        return int(e.code)


def _validate_json(capsys, path: str, reference: str, *flags: str) -> tuple[int, dict]:
    code = _cli(["validate", path, "--reference", reference, "--shapes", SHAPES, "--json", *flags])
    return code, json.loads(capsys.readouterr().out)


def test_defaults_per_dtype_and_overrides():
    assert tolerance("fp32") == Tolerance("fp32", 1e-5, 1e-5, "elemwise")
    assert tolerance("fp16", atol=0.5) == Tolerance("fp16", 0.5, 1e-2, "elemwise")
    assert tolerance("fp16", rtol=0.0, stat="mean") == Tolerance("fp16", 1e-2, 0.0, "mean")
    assert str(tolerance("fp32", atol=1e-3, stat="max")) == "fp32 tolerance: atol 0.001, rtol 1e-05, max error"
    for kwargs in (dict(atol=-1.0), dict(rtol=float("nan")), dict(atol=float("inf")), dict(stat="quantile")):
        with pytest.raises(UsageError):
            tolerance("fp32", **kwargs)


def test_each_statistic_as_polygraphy_defines_it():
    """One outlier of 0.5 among 100 ones: elemwise and max fail; the mean (0.005) and the median
    (0) of the absolute errors are within atol 0.01. NaN fails every statistic."""
    want = {"y": np.ones(100, np.float32)}
    got = {"y": want["y"].copy()}
    got["y"][7] += 0.5
    verdicts = {}
    for stat in ("elemwise", "max", "mean", "median"):
        (out,) = judge(got, want, tolerance("fp32", atol=0.01, rtol=0.01, stat=stat))
        verdicts[stat] = out.passed
        expected = {"elemwise": 0.5, "max": 0.5, "mean": 0.005, "median": 0.0}[stat]
        assert (
            out.name == "y"
            and out.abs_err == pytest.approx(expected, abs=1e-7)
            and out.rel_err == pytest.approx(expected, abs=1e-7)
        ), (stat, out)
    assert verdicts == {"elemwise": False, "max": False, "mean": True, "median": True}
    got["y"][3] = np.nan
    for stat in ("elemwise", "max", "mean", "median"):
        assert not judge(got, want, tolerance("fp32", atol=1e9, rtol=1e9, stat=stat))[0].passed, stat


def test_validate_prints_and_reports_the_rule(exported, capsys):
    path, ckpt, _ = exported
    assert _cli(["validate", path, "--reference", ckpt, "--shapes", SHAPES]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("PASSED (fp32 tolerance: atol 1e-05, rtol 1e-05, elemwise error)"), out
    assert out.count("    logits: max abs") == 2, out  # the statistic per output, per comparison
    code, report = _validate_json(capsys, path, ckpt)
    assert code == 0 and report["tolerance"] == {"dtype": "fp32", "atol": 1e-5, "rtol": 1e-5, "stat": "elemwise"}
    for c in report["comparisons"]:
        (output,) = c["outputs"]
        assert output["name"] == "logits" and output["passed"] and output["abs_err"] == c["max_abs_err"], c


def test_atol_and_rtol_override_the_defaults(exported, capsys):
    """Another model's weights fail at fp32's tolerances and pass within atol 1e3."""
    path, _, other = exported
    code, report = _validate_json(capsys, path, other)
    assert code == 1 and not report["passed"], report
    code, report = _validate_json(capsys, path, other, "--atol", "1e3", "--rtol", "0")
    assert code == 0 and report["passed"], report
    assert report["tolerance"] == {"dtype": "fp32", "atol": 1000.0, "rtol": 0.0, "stat": "elemwise"}


def test_check_error_stat_judges_each_output_on_its_statistic(exported, capsys):
    """An atol above every comparison's median absolute error (other weights) and below every
    one's max: --check-error-stat median passes, max fails."""
    path, _, other = exported
    errors = {}
    for stat in ("median", "max"):
        _, report = _validate_json(capsys, path, other, "--check-error-stat", stat)
        errors[stat] = [c["outputs"][0]["abs_err"] for c in report["comparisons"]]
    assert max(errors["median"]) < min(errors["max"]), errors
    atol = str((max(errors["median"]) + min(errors["max"])) / 2)
    code, report = _validate_json(capsys, path, other, "--check-error-stat", "median", "--atol", atol, "--rtol", "0")
    assert code == 0 and report["tolerance"]["stat"] == "median", report
    code, report = _validate_json(capsys, path, other, "--check-error-stat", "max", "--atol", atol, "--rtol", "0")
    assert code == 1 and not any(c["passed"] for c in report["comparisons"]), report


@pytest.mark.parametrize(
    "flags, reason",
    [
        (["--atol", "-1"], "argument --atol: must be >= 0"),
        (["--rtol", "nan"], "argument --rtol: must be a finite number"),
        (["--atol", "inf"], "argument --atol: must be a finite number"),
        (["--check-error-stat", "quantile"], "argument --check-error-stat: invalid choice: 'quantile'"),
    ],
)
def test_bad_tolerances_are_usage_errors(exported, capsys, flags, reason):
    path, ckpt, _ = exported
    assert _cli(["validate", path, "--reference", ckpt, *flags]) == 2
    err = capsys.readouterr().err
    assert reason in err and "Traceback" not in err, err


def test_export_refuses_check_options_with_no_check(exported, tmp_path, capsys):
    _, ckpt, _ = exported
    out = tmp_path / "m.onnx"
    assert _cli(["export", ckpt, "-o", str(out), "--no-check", "--atol", "1e-3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["attn2onnx: error: --no-check skips the check, so its options do nothing: drop --atol"], err
    assert not out.exists()
