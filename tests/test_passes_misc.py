"""iMHSA -> LandmarkAttention and reuse -> ProbAttention fusions (passes/fuse_imhsa.py, fuse_reuse.py) on stock
exports of the plain-PyTorch layers of tests/plain_variants.py: the fusions fire, outputs are
preserved in ORT at several dynamic shapes (against the eager module), near misses are left
alone, and a second optimize run changes nothing."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from plain_dcmha import export_stock, random_feeds, run_ort
from plain_variants import (
    ColumnSoftmaxReuseStack,
    PlainImhsa,
    PlainReuseStack,
    UnmaskedPoolImhsa,
    WrongAxisMixImhsa,
)

from attn2onnx.passes import optimize_model
from attn2onnx.passes._ir_utils import count_ops, dims, same_dim

D = 32
SHAPES = [(1, 5), (2, 9), (3, 16)]
MODELS = {
    "imhsa_einsum": lambda: PlainImhsa(D, 4, landmarks=3, style="einsum", seed=1),
    "imhsa_matmul": lambda: PlainImhsa(D, 4, landmarks=3, style="matmul", seed=2),
    "imhsa_no_rezero": lambda: PlainImhsa(D, 4, landmarks=5, rezero=False, seed=8),
    "reuse": lambda: PlainReuseStack(D, 4, reuse=(0, 4, 2, 2), causal=True, seed=3),
    "reuse_noncausal": lambda: PlainReuseStack(D, 4, reuse=(0, 4), causal=False, seed=4),
    # near misses
    "imhsa_unmasked_pool": lambda: UnmaskedPoolImhsa(D, 4, landmarks=3, seed=5),
    "imhsa_wrong_axis_mix": lambda: WrongAxisMixImhsa(D, 4, landmarks=4, seed=6),
    "reuse_column_softmax": lambda: ColumnSoftmaxReuseStack(D, 4, reuse=(0, 4, 2, 2), seed=7),
}
# name -> the ai.attn2onnx nodes the ort pipeline must make
FUSED = {
    "imhsa_einsum": {"LandmarkAttention": 1},
    "imhsa_matmul": {"LandmarkAttention": 1},
    "imhsa_no_rezero": {"LandmarkAttention": 1},
    # layer 0 (probabilities reused by layers 1, 2) and layer 2's fresh heads (reused by layer 3);
    # layer 3's probabilities feed only its own @ v
    "reuse": {"ProbAttention": 2},
    "reuse_noncausal": {"ProbAttention": 1},
}
# layer 3 of reuse is plain attention: the ort target's default puts it on StandardAttention
# (passes/native_attention.py), which the standard rule, not fuse_reuse, emits
STANDARD = {"reuse": {"StandardAttention": 1}}
NEAR_MISSES = ["imhsa_unmasked_pool", "imhsa_wrong_axis_mix", "reuse_column_softmax"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(eager module, stock export, ort-optimized export), made once per model."""
    cache: dict = {}
    folder = tmp_path_factory.mktemp("plain_variants")

    def get(name: str):
        if name not in cache:
            module = MODELS[name]().eval()
            stock = onnx.load(export_stock(module, D, str(folder / f"{name}.onnx")))
            fused, report = optimize_model(stock, target="ort")
            cache[name] = module, stock, fused, report
        return cache[name]

    return get


def ours(model: onnx.ModelProto) -> dict[str, int]:
    return {
        k.split("::")[1]: v
        for k, v in count_ops(ir.serde.deserialize_model(model)).items()
        if k.startswith("ai.attn2onnx::")
    }


def assert_matches_eager(module: torch.nn.Module, model: onnx.ModelProto, atol: float = 2e-5) -> None:
    for i, (batch, seq) in enumerate(SHAPES):
        feeds = random_feeds(batch, seq, D, seed=i, pad=3)
        with torch.no_grad():
            expected = module(torch.from_numpy(feeds["x"]), torch.from_numpy(feeds["key_padding_mask"])).numpy()
        np.testing.assert_allclose(run_ort(model, feeds), expected, atol=atol, rtol=1e-5)


@pytest.mark.parametrize("name", list(FUSED))
def test_fuses_and_preserves_outputs(exported, name):
    module, stock, fused, report = exported(name)
    assert ours(fused) == {**FUSED[name], **STANDARD.get(name, {})}
    misc = {op: n for p in report.passes if p["pass"] in ("fuse_imhsa", "fuse_reuse") for op, n in p["fused"].items()}
    assert FUSED[name].items() <= misc.items()
    counts = count_ops(ir.serde.deserialize_model(fused))
    if name.startswith("imhsa"):
        assert "Softmax" not in counts and "Einsum" not in counts and "CumSum" not in counts, counts
    onnx.checker.check_model(fused, full_check=True)
    assert_matches_eager(module, stock)
    assert_matches_eager(module, fused)


def test_reuse_layers_consume_prob_attention_probs(exported):
    """Every slice of probabilities (a reusing layer's heads) reads a ProbAttention output."""
    fused = ir.serde.deserialize_model(exported("reuse")[2])
    prob_outputs = {node.outputs[1].name for node in fused.graph if node.op_type == "ProbAttention"}
    sliced = [
        node
        for node in fused.graph
        if node.op_type == "Slice" and (d := dims(node.inputs[0])) is not None and len(d) == 4 and same_dim(d[2], d[3])
    ]
    assert len(sliced) == 2
    for node in sliced:
        src = node.inputs[0]
        concat = src.producer()
        if concat is not None and concat.op_type == "Concat":  # layer 2: concat(fresh probs, reused slice)
            assert concat.inputs[0].name in prob_outputs
        else:
            assert src.name in prob_outputs


@pytest.mark.parametrize("name", NEAR_MISSES)
def test_near_misses_do_not_fuse(exported, name):
    module, stock, fused, _ = exported(name)
    assert not ({"LandmarkAttention", "ProbAttention"} & set(ours(fused))), ours(fused)
    assert_matches_eager(module, fused)


@pytest.mark.parametrize("name", ["imhsa_einsum", "reuse"])
def test_fusion_is_idempotent(exported, name):
    once = exported(name)[2]
    twice, report = optimize_model(once, target="ort")
    assert not any(p["changed"] for p in report.passes), report.passes
    assert [(n.op_type, list(n.input)) for n in once.graph.node] == [
        (n.op_type, list(n.input)) for n in twice.graph.node
    ]


@pytest.mark.parametrize(
    ("a", "b", "equal"),
    [
        ("past+seq", "past + seq", True),
        ("seq + past", "past+seq", True),  # shape inference's order differs between layers
        ("2*batch + seq", "seq+batch*2", True),
        ("min(past_window7+seq, 7)", "min(past_window7 + seq,7)", True),
        ("past-seq", "past+seq", False),
        ("past+seq", "past+seq+1", False),
        ("seq", "past", False),
        ("min(a+b, 7)", "min(b+a, 7)", False),  # not a plain sum: compared as written
    ],
)
def test_same_dim_reads_sums_in_any_order(a, b, equal):
    assert same_dim(a, b) is equal
    assert same_dim(b, a) is equal
