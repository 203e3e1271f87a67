"""Attention lowering and projection packing on exports of the variant modules: the fused op
appears where it should, outputs are unchanged in ORT at several dynamic shapes (and match
PyTorch), and a second run changes nothing."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from plain_dcmha import random_feeds, run_ort

from attn2onnx.exporter import to_onnx
from attn2onnx.io_spec import InputSpec
from attn2onnx.passes import optimize_model
from attn2onnx.passes._ir_utils import count_ops
from attn2onnx.variants import build_attention

D, N = 32, 4
SHAPES = [(1, 5), (2, 9), (3, 16)]
FUSED = {"ort": "com.microsoft::MultiHeadAttention", "portable": "Attention", "trt": "Attention"}
NATIVE = "ai.attn2onnx::StandardAttention"  # target ort's default for plain cores (passes/native_attention_table.json)
POOLED = ("bn", "sh", "bn-sh")  # PooledNormAttention lowers to MultiHeadAttention either way
# (variant, causal, fused attention nodes): sh / bn-sh run one per group of heads with one
# pooling factor (default factors: two groups)
LOWERED = [
    ("mha", True, 1),
    ("mha", False, 1),
    ("optimised", True, 1),
    ("efficient", False, 1),
    ("super", True, 1),
    ("bn", False, 1),
    ("sh", False, 2),
    ("bn-sh", False, 2),
]
KEPT = ["imhsa", "dcmha"]


@pytest.fixture(scope="module")
def exported():
    cache: dict = {}

    def get(name: str, causal: bool = False, **options):
        key = (name, causal, tuple(sorted(options.items())))
        if key not in cache:
            torch.manual_seed(0)
            options.setdefault("max_len", 32)
            module = build_attention(name, d_model=D, n_heads=N, causal=causal, **options).eval()
            with torch.no_grad():  # non-trivial WA for super (a fresh one is the identity)
                if hasattr(module, "wa"):
                    module.wa.add_(0.1 * torch.randn_like(module.wa))
            specs = [
                InputSpec("x", ("batch", "seq", D), "float"),
                InputSpec("key_padding_mask", ("batch", "seq"), "mask"),
            ]
            x, kpm = torch.randn(2, 8, D), torch.ones(2, 8, dtype=torch.bool)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cache[key] = (module, to_onnx(module, (x, kpm), specs, output_names=["y"]))
        return cache[key]

    return get


def check_outputs(module, stock: onnx.ModelProto, optimised: onnx.ModelProto) -> None:
    for i, (batch, seq) in enumerate(SHAPES):
        feeds = random_feeds(batch, seq, D, seed=i)
        got = run_ort(optimised, feeds)
        np.testing.assert_allclose(got, run_ort(stock, feeds), atol=1e-4, rtol=1e-4)
        with torch.no_grad():
            expected = module(torch.from_numpy(feeds["x"]), torch.from_numpy(feeds["key_padding_mask"])).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def node_of(model: onnx.ModelProto, op_type: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.op_type == op_type)


@pytest.mark.parametrize("target,native", [("ort", True), ("ort", False), ("portable", True)])
@pytest.mark.parametrize("name,causal,fused", LOWERED)
def test_lowered_onto_fused_attention(exported, name, causal, fused, target, native):
    """Target ort by default puts plain cores on StandardAttention (its checked-in table measures it
    faster in every class); with ``native`` off, on MultiHeadAttention as for stock ONNX Runtime."""
    module, stock = exported(name, causal)
    optimised, report = optimize_model(stock, target=target, native=native)
    counts = count_ops(ir.serde.deserialize_model(optimised))
    op = NATIVE if target == "ort" and native and name not in POOLED else FUSED[target]
    assert counts.get(op) == fused and sum(counts.get(o, 0) for o in {NATIVE, *FUSED.values()}) == fused, counts
    assert "Softmax" not in counts and "ai.attn2onnx::PooledNormAttention" not in counts
    check_outputs(module, stock, optimised)
    again, report2 = optimize_model(optimised, target=target, native=native)
    assert not any(p["changed"] for p in report2.passes), report2.passes


def test_mha_packs_qkv_and_uses_mask_attributes(exported):
    """Padding alone: MHA's key_padding_mask; with causality a [B,1,T,S] bias instead, as MHA's
    causal mode spreads a fully masked row over the causal keys only (test_mask_contract.py)."""
    _, stock = exported("mha", False)
    optimised, _ = optimize_model(stock, target="ort", native=False)
    counts = count_ops(ir.serde.deserialize_model(optimised))
    assert counts["MatMul"] == 2 and counts["Split"] == 1  # [Wq|Wk|Wv] and Wo
    mha = node_of(optimised, "MultiHeadAttention")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in mha.attribute}
    assert attrs["unidirectional"] == 0 and attrs["num_heads"] == N
    assert mha.input[4]  # key_padding_mask, no [B,1,T,S] bias
    assert len(mha.input) < 6 or not mha.input[5]
    causal = node_of(optimize_model(exported("mha", True)[1], target="ort", native=False)[0], "MultiHeadAttention")
    assert not causal.input[4] and causal.input[5]


@pytest.mark.parametrize(
    "name,options,fused",
    [
        ("sh", {"sh_factors": (2, 1, 3, 1)}, 3),
        ("bn-sh", {"sh_factors": (3, 3, 3, 3), "rescale": False, "beta": 0.5}, 1),
    ],
)
def test_pooled_heads_grouped_by_factor(exported, name, options, fused):
    """Heads grouped by factor whatever their order, and put back in order; partial windows."""
    module, stock = exported(name, False, **options)
    optimised, _ = optimize_model(stock, target="ort")
    assert count_ops(ir.serde.deserialize_model(optimised)).get(FUSED["ort"]) == fused
    check_outputs(module, stock, optimised)


def test_sliced_heads_feed_the_fused_op_directly(exported):
    """efficient: k = v = x (no projection); super: v = SuperMix(x) computed once per layer, then
    only elementwise (WA's bias added, padded rows re-zeroed: Add / Mul), no projection."""
    optimised, _ = optimize_model(exported("efficient")[1], target="ort")
    mha = node_of(optimised, "StandardAttention")
    assert mha.input[1] == "x" and mha.input[2] == "x"
    optimised, _ = optimize_model(exported("super", True)[1], target="ort", native=False)
    mix = node_of(optimised, "SuperMix")
    producers = {out: n for n in optimised.graph.node for out in n.output}
    values = [node_of(optimised, "MultiHeadAttention").input[2]]
    while mix.output[0] not in values and values:
        values = [
            i for v in values if v in producers and producers[v].op_type in ("Add", "Mul") for i in producers[v].input
        ]
    assert mix.output[0] in values
    assert sum(n.op_type == "SuperMix" for n in optimised.graph.node) == 1


def test_dcmha_wide_gemm(exported):
    """[Wq|Wk|Wv|dw1|dd] share x: one wide GEMM (the output projection is the other MatMul)."""
    module, stock = exported("dcmha", True)
    optimised, _ = optimize_model(stock, target="ort")
    matmuls = [n for n in optimised.graph.node if n.op_type == "MatMul"]
    assert len(matmuls) == 2
    widths = {init.name: init.dims[1] for init in optimised.graph.initializer if len(init.dims) == 2}
    assert max(widths.get(m.input[1], 0) for m in matmuls) == 3 * D + 4 * 4 * N + 4 * N
    check_outputs(module, stock, optimised)


@pytest.mark.parametrize("name", KEPT)
def test_other_variants_keep_their_ops(exported, name):
    module, stock = exported(name)
    optimised, _ = optimize_model(stock, target="ort")
    before = {k: v for k, v in count_ops(ir.serde.deserialize_model(stock)).items() if k.startswith("ai.attn2onnx")}
    after = {k: v for k, v in count_ops(ir.serde.deserialize_model(optimised)).items() if k.startswith("ai.attn2onnx")}
    assert before == after
    check_outputs(module, stock, optimised)


def test_stock_super_mix_is_fused(tmp_path):
    """The stock exporter decomposes super's token mix (Slice/Trilu/Mul/MatMul); fuse_super_mix turns
    it back into one SuperMix node, and the core is lowered as usual."""
    torch.manual_seed(0)
    module = build_attention("super", d_model=D, n_heads=N, causal=True, max_len=32).eval()
    with torch.no_grad():
        module.wa.add_(0.1 * torch.randn_like(module.wa))
    specs = [InputSpec("x", ("batch", "seq", D), "float"), InputSpec("key_padding_mask", ("batch", "seq"), "mask")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stock = to_onnx(
            module,
            (torch.randn(2, 8, D), torch.ones(2, 8, dtype=torch.bool)),
            specs,
            output_names=["y"],
            custom=False,
            max_seq=32,
        )
    assert not any(n.domain for n in stock.graph.node)
    optimised, report = optimize_model(stock, target="ort")
    counts = count_ops(ir.serde.deserialize_model(optimised))
    assert counts.get("ai.attn2onnx::SuperMix") == 1 and counts.get(NATIVE) == 1, counts
    check_outputs(module, stock, optimised)
    _, again = optimize_model(optimised, target="ort")
    assert not any(p["changed"] for p in again.passes)
