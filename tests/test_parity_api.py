"""attn2onnx.check_parity: the parity check as one library call (what validate, export and demo
print), for plain graphs and decode graphs, with the reference as a file or a module; and the
CLI giving exactly its report."""

from __future__ import annotations

import json

import onnx
import onnx.helper as oh
import pytest
import torch

import attn2onnx
from attn2onnx import cli
from attn2onnx.errors import UsageError
from attn2onnx.models.decode import export_decode
from attn2onnx.sources import from_module
from attn2onnx.validate import Comparison, ParityReport

SHAPES = [(1, 5), (2, 9)]


def tiny_lm(seed: int = 0) -> torch.nn.Module:
    config = attn2onnx.ModelConfig(family="lm", variant="mha", layers=1, d_model=32, heads=4, max_len=64, seed=seed)
    return attn2onnx.build_model(config).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[torch.nn.Module, str, str]:
    """A tiny LM: its checkpoint and its ONNX export."""
    folder = tmp_path_factory.mktemp("parity")
    model = tiny_lm()
    attn2onnx.save(model, folder / "lm.pt")
    source = from_module(model)
    attn2onnx.export(
        model,
        source.example_inputs(2, 8),
        folder / "lm.onnx",
        specs=source.specs,
        output_names=source.output_names,
        max_seq=source.max_seq,
    )
    return model, str(folder / "lm.pt"), str(folder / "lm.onnx")


def test_check_parity_with_a_module_or_a_file(exported):
    model, ckpt, path = exported
    for reference in (model, ckpt, from_module(model)):
        report = attn2onnx.check_parity(path, reference, SHAPES, ["ort"], "fp32")
        assert isinstance(report, ParityReport) and report.passed
        assert [(c.backend, c.shape) for c in report.comparisons] == [("ort", [1, 5]), ("ort", [2, 9])]
        assert json.loads(report.to_json()) == report.to_dict() and report.to_dict()["passed"] is True


def test_check_parity_reports_a_mismatch(exported):
    _, _, path = exported
    report = attn2onnx.check_parity(path, tiny_lm(seed=1), SHAPES)  # same shapes, other weights
    assert report.comparisons and not report.passed and not any(c.passed for c in report.comparisons)


def test_an_empty_report_does_not_pass():
    assert not ParityReport([]).passed
    assert ParityReport([Comparison("ort", [1, 5], 0.0, 0.0, True)]).passed


def test_validate_prints_the_library_report(exported, capsys):
    _, ckpt, path = exported
    assert cli.main(["validate", path, "--reference", ckpt, "--shapes", "1x5,2x9", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == attn2onnx.check_parity(path, ckpt, SHAPES).to_dict()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(backends=[]), "no backend"),
        (dict(backends=["tpu"]), "unknown backend"),
        (dict(dtype="fp16"), "computes in fp32"),
        (dict(shapes=[(1, 70)]), "exceeds the model's maximum"),
    ],
)
def test_check_parity_refuses_what_it_cannot_compare(exported, kwargs, match):
    model, _, path = exported
    with pytest.raises(UsageError, match=match):
        attn2onnx.check_parity(path, model, **kwargs)


def test_check_parity_of_a_decode_graph(tmp_path):
    model = tiny_lm()
    export_decode(model, tmp_path / "lm.decode.onnx")
    path = str(tmp_path / "lm.decode.onnx")
    report = attn2onnx.check_parity(path, model, [(1, 3), (2, 4)], decode=True, steps=2)
    assert report.passed and [c.shape for c in report.comparisons] == [[1, 3, 2], [2, 4, 2]]
    assert {c.backend for c in report.comparisons} == {"ort-decode"}
    with pytest.raises(UsageError, match="ONNX Runtime only"):
        attn2onnx.check_parity(path, model, backends=["trt"], decode=True)


def test_build_engine_shape_argument_is_a_one_line_error(tmp_path, capsys):
    x = oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4])
    y = oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 4])
    graph = oh.make_graph([oh.make_node("Relu", ["x"], ["y"])], "relu", [x], [y])
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 23)]), tmp_path / "m.onnx")
    assert (
        cli.main(["build-engine", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "m.engine"), "--shape", "x=1xz"]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dims must be integers" in err[0]
