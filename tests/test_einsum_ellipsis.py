"""Einsum equations written with an ellipsis ('...qd,...kd->...qk'): passes/_match.py spells the
'...' out as letters of its own, one per ellipsis axis (right-aligned across the inputs, as numpy
broadcasts), so attention cores written that way fuse like 'bhqd,bhkd->bhqk' ones; a '...' whose
axes broadcast (a 1 against H) is refused, and ``optimize --explain`` says so. The corpus entries
``einsum_ellipsis`` / ``einsum_ellipsis_causal`` (tests/test_corpus.py) cover the exported form.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from plain_dcmha import run_ort

from attn2onnx import cli
from attn2onnx.passes import optimize_model
from attn2onnx.passes._ir_utils import count_ops
from attn2onnx.passes._match import NoMatch, einsum_terms, parse_equation
from attn2onnx.passes.explain import explain

Shape = list[int | str | None] | None  # None: unknown rank
HEADS, HEAD = 4, 8
QKV = ["batch", HEADS, "seq", HEAD]
MIX = "...qk,...kd->...qd"


def _einsum(equation: str, *shapes: Shape) -> ir.Node:
    """The Einsum node of a one-node model whose inputs have ``shapes``."""
    names = [f"x{i}" for i in range(len(shapes))]
    inputs = [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, s) if s is not None else helper.make_value_info(n, _any())
        for n, s in zip(names, shapes)
    ]
    node = helper.make_node("Einsum", names, ["y"], equation=equation)
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    (einsum,) = ir.serde.deserialize_model(helper.make_model(graph)).graph
    return einsum


def _any() -> onnx.TypeProto:
    """A float tensor type of unknown rank."""
    return helper.make_tensor_type_proto(TensorProto.FLOAT, None)


@pytest.mark.parametrize(
    "equation, shapes, expected",
    [
        ("bhqd,bhkd->bhqk", (QKV, QKV), (["bhqd", "bhkd"], "bhqk")),  # no ellipsis: unchanged
        ("...qd,...kd->...qk", (["seq", HEAD], ["seq", HEAD]), (["qd", "kd"], "qk")),  # 0 axes
        ("...qd,...kd->...qk", (["n", "seq", HEAD], ["n", "seq", HEAD]), (["aqd", "akd"], "aqk")),  # 1 axis
        ("...qd,...kd->...qk", (QKV, QKV), (["abqd", "abkd"], "abqk")),  # 2 axes
        ("... q d, ... k d -> ... q k", (QKV, QKV), (["abqd", "abkd"], "abqk")),  # spaces
        ("...qd,...kd->...qk", (QKV, [HEADS, "seq", HEAD]), (["abqd", "bkd"], "abqk")),  # right-aligned
        ("b...qd,b...kd->b...qk", (QKV, QKV), (["baqd", "bakd"], "baqk")),  # ellipsis inside
        (MIX, (["batch", HEADS, "seq", "seq"], QKV), (["abqk", "abkd"], "abqd")),  # the mix
        ("gh,bh...->bg...", ([HEADS, HEADS], QKV), (["gh", "bhac"], "bgac")),  # iMHSA's head mix
    ],
)
def test_ellipsis_spelled_out(equation, shapes, expected):
    assert parse_equation(_einsum(equation, *shapes)) == expected


@pytest.mark.parametrize(
    "equation, shapes, reason",
    [
        ("...qd,...kd->...qk", (QKV, ["batch", 1, "seq", HEAD]), "no broadcasting"),  # 1 against H
        ("...qd,...kd->...qk", (QKV, [None, HEADS, "seq", HEAD]), "no broadcasting"),  # not known equal
        ("...qd,...kd->...qk", (QKV, None), "known rank"),
        ("...qd,...kd->qk", (QKV, QKV), "keeps the '...' axes"),  # torch would sum them
        ("...qd,...kd", (QKV, QKV), "explicit output"),
    ],
)
def test_ellipsis_refused_with_a_reason(equation, shapes, reason):
    node = _einsum(equation, *shapes)
    assert parse_equation(node) is None
    with pytest.raises(NoMatch, match=reason):
        einsum_terms(node)


def _core(mix: str, k_shape: list, q_shape: list = QKV) -> onnx.ModelProto:
    """softmax(einsum('...qd,...kd->...qk', q, k) / sqrt(d)) mixed with v by ``mix``, shapes inferred."""
    nodes = [
        helper.make_node("Einsum", ["q", "k"], ["qk"], "qk", equation="...qd,...kd->...qk"),
        helper.make_node("Mul", ["qk", "scale"], ["logits"], "scale"),
        helper.make_node("Softmax", ["logits"], ["probs"], "softmax", axis=-1),  # explain keys cores by name
        helper.make_node("Einsum", ["probs", "v"], ["y"], "pv", equation=mix),
    ]
    graph = helper.make_graph(
        nodes,
        "core",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in (("q", q_shape), ("k", k_shape))]
        + [helper.make_tensor_value_info("v", TensorProto.FLOAT, q_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [helper.make_tensor("scale", TensorProto.FLOAT, [], [HEAD**-0.5])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def _reference(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    logits = np.einsum("...qd,...kd->...qk", q, k) * HEAD**-0.5
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum(MIX, probs / probs.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("target, op", [("ort", "com.microsoft::MultiHeadAttention"), ("portable", "Attention")])
@pytest.mark.parametrize("shape", [QKV, ["n", "seq", HEAD]], ids=["two_axes", "one_axis"])
def test_ellipsis_core_fuses_with_parity(target, op, shape):
    fused = optimize_model(_core(MIX, shape, shape), target=target)[0]
    ops = count_ops(ir.serde.deserialize_model(fused))
    assert ops.get(op) == 1 and "Softmax" not in ops and "Einsum" not in ops, ops
    rng = np.random.default_rng(0)
    for sizes in ((2, HEADS, 5, HEAD), (3, HEADS, 9, HEAD)):
        dims = sizes if len(shape) == 4 else (sizes[0] * HEADS, *sizes[2:])
        q, k, v = (rng.standard_normal(dims).astype(np.float32) for _ in range(3))
        np.testing.assert_allclose(run_ort(fused, {"q": q, "k": k, "v": v}), _reference(q, k, v), atol=1e-5)


def test_ellipsis_mix_over_queries_never_fuses():
    """A near miss: '...qk,...qd->...kd' weights values along the query axis; explain says so."""
    model = _core("...qk,...qd->...kd", QKV)
    assert "Softmax" in count_ops(ir.serde.deserialize_model(optimize_model(model, target="ort")[0]))
    (outcome,) = explain(model, target="ort")
    assert not outcome.fused and "a mix over the probabilities' key axis" in outcome.reason, outcome


def test_explain_names_a_broadcast_ellipsis(tmp_path, capsys):
    """k with one head broadcast against q's four: refused, and --explain names the Einsum and the dims."""
    path = tmp_path / "broadcast.onnx"
    onnx.save(_core(MIX, ["batch", 1, "seq", HEAD]), path)
    code = cli.main(["optimize", str(path), "-o", str(tmp_path / "broadcast.opt.onnx"), "--explain"])
    out = capsys.readouterr().out
    assert code == 0 and "attention cores: 1, fused 0" in out, out
    assert "Einsum" in out and "expected the '...' axes equal in every input (no broadcasting)" in out, out
    assert "found dims [4, 1] on one '...' axis" in out, out
