"""``optimize --json --explain`` prints one JSON document (the explanation inside it), and
``--explain`` counts attention that already is a fused op -- an ``ai.attn2onnx`` custom op
(DCMHA), one the pipeline lowers (sh's PooledNormAttention), ONNX Runtime's contrib attention
of an optimised graph -- as fused cores naming the op, instead of "attention cores: 0"."""

from __future__ import annotations

import json

import pytest

import attn2onnx
from attn2onnx import cli
from attn2onnx.sources import from_module


@pytest.fixture(scope="module")
def layers(tmp_path_factory) -> dict[str, str]:
    """Exported single attention layers by variant: mha (a Softmax core), dcmha
    (ai.attn2onnx::DcmhaAttention) and sh (ai.attn2onnx::PooledNormAttention)."""
    folder = tmp_path_factory.mktemp("explain")
    paths = {}
    for variant in ("mha", "dcmha", "sh"):
        config = attn2onnx.ModelConfig(family="layer", variant=variant, d_model=32, heads=4, max_len=32)
        model = attn2onnx.build_model(config).eval()
        source = from_module(model)
        path = folder / f"{variant}.onnx"
        attn2onnx.export(model, source.example_inputs(2, 8), path, specs=source.specs, output_names=source.output_names)
        paths[variant] = str(path)
    return paths


def _optimize(capsys, path: str, out: str, *flags: str) -> str:
    assert cli.main(["optimize", path, "-o", out, *flags]) == 0
    return capsys.readouterr().out


def test_json_explain_is_one_document(layers, tmp_path, capsys):
    out = _optimize(capsys, layers["mha"], str(tmp_path / "mha.opt.onnx"), "--json", "--explain")
    doc = json.loads(out)  # one document: nothing printed after it
    assert doc["nodes_after"] <= doc["nodes_before"], doc
    assert doc["explain"] == {
        "attention_cores": 1,
        "fused": 1,
        "cores": [{"core": "Softmax 'node_softmax'", "fused": True, "reason": "", "op": ""}],
    }, doc


@pytest.mark.parametrize(
    "variant, target, op, after",
    [
        ("dcmha", "ort", "ai.attn2onnx::DcmhaAttention", "kept"),
        ("dcmha", "trt", "ai.attn2onnx::DcmhaAttention", "kept"),
        ("sh", "ort", "ai.attn2onnx::PooledNormAttention", "lowered"),
        ("sh", "portable", "ai.attn2onnx::PooledNormAttention", "lowered"),
    ],
)
def test_explain_lists_custom_attention_ops_as_fused(layers, tmp_path, capsys, variant, target, op, after):
    out = _optimize(capsys, layers[variant], str(tmp_path / "o.onnx"), "--target", target, "--explain")
    assert "attention cores: 1, fused 1" in out, out
    assert f": fused (already {op}, {after}" in out, out
    flags = ("--target", target, "--json", "--explain")
    doc = json.loads(_optimize(capsys, layers[variant], str(tmp_path / "o.onnx"), *flags))
    (core,) = doc["explain"]["cores"]
    assert core["fused"] and core["op"] == op, core


def test_explain_counts_contrib_attention_of_an_optimised_graph(layers, tmp_path, capsys):
    """mha optimised for ort with --no-native-attention holds com.microsoft::MultiHeadAttention,
    by default ai.attn2onnx::StandardAttention: optimising it again lists it."""
    for flags, op in [
        (("--no-native-attention",), "com.microsoft::MultiHeadAttention"),
        ((), "ai.attn2onnx::StandardAttention"),
    ]:
        _optimize(capsys, layers["mha"], str(tmp_path / "mha.ort.onnx"), "--target", "ort", *flags)
        out = _optimize(capsys, str(tmp_path / "mha.ort.onnx"), str(tmp_path / "again.onnx"), "--explain", *flags)
        assert "attention cores: 1, fused 1" in out and f"already {op}" in out, out
