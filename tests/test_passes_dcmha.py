"""DCMHA fusion on stock exports of plain-PyTorch DCMHA (tests/plain_dcmha.py): fires on the
three styles, not on the near misses, preserves outputs in ORT at several dynamic shapes, and
is idempotent."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from plain_dcmha import NEAR_MISSES, STYLES, export_stock, random_feeds, run_ort

from attn2onnx.passes import optimize_model
from attn2onnx.passes._ir_utils import count_ops
from attn2onnx.passes.fuse_dcmha import FuseDcmhaPass

D = 32
SHAPES = [(1, 5), (2, 9), (3, 16)]
CONFIGS = {"causal_static": dict(causal=True, static_mix=True), "plain": dict(causal=False, static_mix=False)}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Stock exports, made once per (module, config)."""
    cache: dict = {}
    folder = tmp_path_factory.mktemp("plain_dcmha")

    def get(name: str, config: str = "causal_static") -> onnx.ModelProto:
        key = (name, config)
        if key not in cache:
            cls = {**STYLES, **NEAR_MISSES}[name]
            torch.manual_seed(0)
            module = cls(d_model=D, n_heads=4, rank=2, seed=1, **CONFIGS[config])
            cache[key] = onnx.load(export_stock(module, D, str(folder / f"{name}_{config}.onnx")))
        return cache[key]

    return get


def assert_same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, atol: float = 2e-4) -> None:
    for i, (batch, seq) in enumerate(SHAPES):
        feeds = random_feeds(batch, seq, D, seed=i)
        np.testing.assert_allclose(run_ort(b, feeds), run_ort(a, feeds), atol=atol, rtol=1e-4)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("style", list(STYLES))
def test_styles_fuse_into_dcmha_attention(exported, style, config):
    stock = exported(style, config)
    fused, report = optimize_model(stock, target="portable")
    counts = count_ops(ir.serde.deserialize_model(fused))
    assert counts.get("ai.attn2onnx::DcmhaAttention") == 1, counts
    assert "Softmax" not in counts and "ai.attn2onnx::DcmhaCompose" not in counts
    assert {"DcmhaAttention": 1}.items() <= next(p["fused"] for p in report.passes if p["pass"] == "fuse_dcmha").items()
    onnx.checker.check_model(fused, full_check=True)
    assert_same_outputs(stock, fused)


@pytest.mark.parametrize("style", list(STYLES))
def test_compose_only_fusion(exported, style):
    """Without the attention step both composes become DcmhaCompose nodes (their bodies run)."""
    model = ir.serde.deserialize_model(exported(style))
    p = FuseDcmhaPass(attention=False)
    p(model)
    assert p.counts == {"DcmhaCompose": 2, "DcmhaAttention": 0}
    assert count_ops(model)["ai.attn2onnx::DcmhaCompose"] == 2
    assert_same_outputs(exported(style), ir.serde.serialize_model(model))


@pytest.mark.parametrize("name", list(NEAR_MISSES))
def test_near_misses_do_not_fuse(exported, name):
    stock = exported(name)
    fused, _ = optimize_model(stock, target="portable")
    counts = count_ops(ir.serde.deserialize_model(fused))
    assert "ai.attn2onnx::DcmhaAttention" not in counts
    if name == "mask_before":
        # each compose alone is still an exact compose (it is linear), but the core is not
        # DCMHA's: the mask sits before the pre compose, so no DcmhaAttention
        assert counts.get("ai.attn2onnx::DcmhaCompose") == 2
    else:
        assert "ai.attn2onnx::DcmhaCompose" not in counts
    assert_same_outputs(stock, fused)


@pytest.mark.parametrize("style", list(STYLES))
def test_fusion_is_idempotent(exported, style):
    once, _ = optimize_model(exported(style), target="portable")
    twice, report = optimize_model(once, target="portable")
    assert not any(p["changed"] for p in report.passes), report.passes
    assert [(n.op_type, list(n.input)) for n in once.graph.node] == [
        (n.op_type, list(n.input)) for n in twice.graph.node
    ]


def test_matches_pytorch(exported):
    """The fused graph against the eager module itself (not just the stock export)."""
    torch.manual_seed(0)
    module = STYLES["rank_einsum"](d_model=D, n_heads=4, rank=2, seed=1, **CONFIGS["causal_static"]).eval()
    fused, _ = optimize_model(exported("rank_einsum"), target="portable")
    feeds = random_feeds(2, 11, D, seed=5)
    with torch.no_grad():
        expected = module(torch.from_numpy(feeds["x"]), torch.from_numpy(feeds["key_padding_mask"])).numpy()
    np.testing.assert_allclose(run_ort(fused, feeds), expected, atol=2e-4, rtol=1e-4)
