"""onnxscript's ORT fusions as the ``ort_fusions`` stage of the ort pipeline (passes/ort_stage.py):
our ``ai.attn2onnx`` op bodies survive it untouched (never inlined), it fuses what our rules leave
(LayerNorm + residual, GELU) and a corpus core on its own, outputs keep parity with PyTorch, and a
model the library cannot handle keeps the pipeline's result."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import corpus  # noqa: E402
from plain_dcmha import run_ort  # noqa: E402
from test_fp16_fusion import assert_parity, export, source_of  # noqa: E402

from attn2onnx.passes import optimize_model  # noqa: E402
from attn2onnx.passes._ir_utils import DOMAIN, count_ops  # noqa: E402
from attn2onnx.passes.ort_stage import OrtFusionStage  # noqa: E402

SHAPES = [(2, 16), (3, 9)]


def bodies(model: onnx.ModelProto) -> dict[str, bytes]:
    return {f.name: f.SerializeToString(deterministic=True) for f in model.functions if f.domain == DOMAIN}


@pytest.mark.parametrize("variant,op", [("dcmha", "DcmhaAttention"), ("imhsa", "LandmarkAttention")])
def test_stage_fuses_around_our_ops_and_keeps_their_bodies(variant, op, tmp_path):
    """An encoder (LayerNorm, GELU MLP) with our op: onnxscript fuses the norms and GELUs, our
    nodes and their function bodies come out exactly as they went in, outputs keep parity."""
    source = source_of(variant, "encoder")
    stock = export(source, "fp32")
    optimised, report = optimize_model(stock, target="ort")
    stage = next(p for p in report.passes if p["pass"] == "ort_fusions")
    assert stage["changed"] and stage["fused"].get("skip_layer_normalization") == 4, stage
    ops = count_ops(ir.serde.deserialize_model(optimised))
    assert ops[f"{DOMAIN}::{op}"] == 2 and ops["com.microsoft::SkipLayerNormalization"] == 4, ops
    before = bodies(stock)
    assert before and bodies(optimised) == before
    assert_parity(optimised, source, "fp32", SHAPES, tmp_path / "stage.onnx")


def test_stage_fuses_a_corpus_core_on_its_own():
    """timm's ViT attention, stock export: onnxscript's rules alone make MultiHeadAttention."""
    entry = next(e for e in corpus.ENTRIES if e.name == "timm_vit")
    module = corpus.build(entry)
    stock = corpus.export(entry, module)
    model = ir.serde.deserialize_model(stock)
    stage = OrtFusionStage()
    assert stage(model).modified and stage.counts.get("sdpa") == 1
    assert count_ops(model).get("com.microsoft::MultiHeadAttention") == 1
    fused = ir.serde.serialize_model(model)
    for seed, (batch, seq) in enumerate([(4, 7), (3, 16)]):
        feeds = corpus.inputs(entry, batch, seq, seed)
        with torch.no_grad():
            expected = module(torch.from_numpy(feeds["x"])).numpy()
        np.testing.assert_allclose(run_ort(fused, feeds), expected, atol=1e-4, rtol=1e-4)


def test_model_without_anything_to_fuse_is_left_as_it_was():
    """A causal LM (RMSNorm, SwiGLU, our attention fused already): the stage reports no change and
    the second optimize run changes nothing either."""
    once, report = optimize_model(export(source_of("mha", "lm"), "fp32"), target="ort")
    assert not next(p for p in report.passes if p["pass"] == "ort_fusions")["changed"]
    twice, again = optimize_model(once, target="ort")
    assert not any(p["changed"] for p in again.passes)
    assert [(n.op_type, list(n.input)) for n in once.graph.node] == [
        (n.op_type, list(n.input)) for n in twice.graph.node
    ]


def test_a_failing_library_keeps_the_pipeline_result(monkeypatch):
    """optimize_for_ort raising (a model it cannot handle) leaves the model untouched, no error."""
    import onnxscript.rewriter.ort_fusions as fusions

    def broken(model, *args, **kwargs):
        model.graph.remove(next(iter(model.graph)), safe=False)  # half-way changes: must not leak out
        raise RuntimeError("cannot handle this model")

    monkeypatch.setattr(fusions, "optimize_for_ort", broken)
    model = ir.serde.deserialize_model(export(source_of("mha", "encoder"), "fp32"))
    nodes = [n.name for n in model.graph]
    assert not OrtFusionStage()(model).modified
    assert [n.name for n in model.graph] == nodes


@pytest.mark.parametrize("name", ["llama_eager", "llama_rope_sdpa"])
def test_optimize_leaves_the_callers_model_as_it_was(name):
    """optimize_model(proto) gives a new model and changes nothing in the one passed: the stage
    once worked on a clone that shared the initializers' tensors, and the optimizer's renaming
    renamed them in the caller's ModelProto (a second optimize of it then read dangling names)."""
    entry = next(e for e in corpus.ENTRIES if e.name == name)
    stock = corpus.export(entry, corpus.build(entry))
    before = stock.SerializeToString()
    optimize_model(stock, target="ort")
    assert stock.SerializeToString() == before
    portable, _ = optimize_model(stock, target="portable")
    onnx.checker.check_model(portable, full_check=True)
