"""Fusions on fp16 exports and on static exports (issue 9, part 4).

An fp16 export computes the contract's masked softmax in fp32: the logits are cast up before the
mask's Where, the probabilities cast back after the Softmax. Every fusion must see through that
pair and build its fused op in the graph's precision (com.microsoft.MultiHeadAttention in fp16,
ProbAttention / LandmarkAttention / DcmhaAttention whose bodies and kernel upcast as the graph
did). A static export folds the causal ``tril`` into a constant, which must still read as causal.
Each case: the expected fused ops after ``optimize --target ort``, and the optimised file against
the fp32 PyTorch model in ORT at two dynamic shapes within the fp16 tolerances (padded rows included).
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import warnings
from pathlib import Path

import onnx
import onnx_ir as ir
import pytest
import torch

from attn2onnx import ModelConfig, build_model
from attn2onnx.exporter import to_onnx
from attn2onnx.io_spec import InputSpec, random_inputs, with_precision
from attn2onnx.passes import optimize_model
from attn2onnx.passes._ir_utils import count_ops
from attn2onnx.sources import ModelSource, from_module
from attn2onnx.validate import check_parity

sys.path.insert(0, str(Path(__file__).parent))
from plain_variants import PlainReuseStack  # noqa: E402

SHAPES = [(2, 16), (3, 9)]
MHA = "com.microsoft::MultiHeadAttention"
TINY = dict(d_model=32, heads=4, max_len=24, vocab_size=13, num_classes=3, layers=2)

# (variant, family, stock export, expected fused ops with native attention off, com.microsoft's
# forms) -- layers=2: one fused op per layer.
# Stock exports decompose our ops into their references (what plain PyTorch code exports): the
# fusions must rebuild them. lm = causal, encoder = non-causal; every input is padded.
CASES = [
    ("mha", "lm", False, {MHA: 2}),
    ("mha", "encoder", False, {MHA: 2}),
    ("optimised", "lm", False, {MHA: 2}),
    ("efficient", "encoder", False, {MHA: 2}),
    ("super", "lm", False, {MHA: 2, "ai.attn2onnx::SuperMix": 2}),
    ("super", "lm", True, {MHA: 2, "ai.attn2onnx::SuperMix": 2}),
    # layer 0's probabilities are reused by layer 1 (ProbAttention); layer 1's fresh heads are plain attention
    ("reuse", "lm", True, {"ai.attn2onnx::ProbAttention": 1, MHA: 1}),
    ("reuse", "encoder", True, {"ai.attn2onnx::ProbAttention": 1, MHA: 1}),
    ("imhsa", "encoder", False, {"ai.attn2onnx::LandmarkAttention": 2}),
    ("dcmha", "lm", False, {"ai.attn2onnx::DcmhaAttention": 2}),
]
IDS = [f"{v}-{f}" + ("-stock" if s else "") for v, f, s, _ in CASES]


def source_of(variant: str, family: str) -> ModelSource:
    torch.manual_seed(0)
    options = dict(TINY, reuse_schedule=[0, 2]) if variant == "reuse" else TINY
    return from_module(build_model(ModelConfig(family=family, variant=variant, **options)))


def export(source: ModelSource, dtype: str, stock: bool = False, static: bool = False) -> onnx.ModelProto:
    """``attn2onnx export --dtype`` (``stock``: our ops decomposed; ``static``: every dim fixed)."""
    specs = with_precision(source.specs, dtype)
    module = copy.deepcopy(source.module).half() if dtype == "fp16" else source.module
    example = [torch.from_numpy(a) for a in random_inputs(specs, 2, 8, pad=False).values()]
    if static:
        specs = [dataclasses.replace(s, dims=tuple(example[i].shape)) for i, s in enumerate(specs)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return to_onnx(
            module, example, specs, output_names=source.output_names, max_seq=source.max_seq, custom=not stock
        )


def fused_ops(model: onnx.ModelProto) -> dict[str, int]:
    """The fused attention ops (our op set's and com.microsoft's *Attention), not the norm / GELU
    fusions the ort pipeline's onnxscript stage adds around them in an encoder."""
    counts = count_ops(ir.serde.deserialize_model(model))
    return {k: v for k, v in counts.items() if k.startswith("ai.attn2onnx::") or k.endswith("Attention")}


def assert_parity(model: onnx.ModelProto, source: ModelSource, dtype: str, shapes, path: Path) -> None:
    onnx.save(model, path)
    report = check_parity(path, source, shapes, dtype=dtype)
    assert report.passed, [(c.shape, c.max_abs_err, c.max_rel_err) for c in report.comparisons]


@pytest.mark.parametrize("variant,family,stock,expected", CASES, ids=IDS)
def test_fp16_export_fuses_with_parity(variant, family, stock, expected, tmp_path):
    source = source_of(variant, family)
    optimised, _ = optimize_model(export(source, "fp16", stock=stock), target="ort", native=False)
    assert fused_ops(optimised) == expected
    assert_parity(optimised, source, "fp16", SHAPES, tmp_path / "fp16.onnx")


def test_fp16_default_ort_uses_standard_attention(tmp_path):
    """Target ort's default (native attention on): the fp16 lm's plain cores on StandardAttention."""
    source = source_of("mha", "lm")
    optimised, _ = optimize_model(export(source, "fp16"), target="ort")
    assert fused_ops(optimised) == {"ai.attn2onnx::StandardAttention": 2}
    assert_parity(optimised, source, "fp16", SHAPES, tmp_path / "fp16.onnx")


# -- static exports -----------------------------------------------------------------------------
def plain_reuse_export(static: bool) -> tuple[torch.nn.Module, onnx.ModelProto]:
    """A reuse stack written in plain PyTorch (causal mask ``ones(T, T).tril()``), stock export."""
    module = PlainReuseStack(32, 4, reuse=(0, 4, 2, 2), causal=True, seed=3).eval()
    specs = [InputSpec("x", ("batch", "seq", 32), "float"), InputSpec("key_padding_mask", ("batch", "seq"), "mask")]
    example = (torch.randn(2, 8, 32), torch.ones(2, 8, dtype=torch.bool))
    if static:
        specs = [dataclasses.replace(s, dims=tuple(example[i].shape)) for i, s in enumerate(specs)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return module, to_onnx(module, example, specs, output_names=["y"])


@pytest.mark.parametrize("static", [True, False], ids=["static", "dynamic"])
def test_plain_reuse_fuses_in_static_and_dynamic_exports(static, tmp_path):
    """Layers 0 and 2 pass probabilities on (ProbAttention); layer 3's fresh heads are plain attention.
    A static export holds the causal mask as a constant lower-triangular tensor."""
    module, stock = plain_reuse_export(static)
    optimised, _ = optimize_model(stock, target="ort", native=False)
    assert fused_ops(optimised) == {"ai.attn2onnx::ProbAttention": 2, MHA: 1}
    source = ModelSource(
        module,
        [InputSpec("x", ("batch", "seq", 32), "float"), InputSpec("key_padding_mask", ("batch", "seq"), "mask")],
        ["y"],
        None,
    )
    assert_parity(optimised, source, "fp32", [(2, 8)] if static else SHAPES, tmp_path / "reuse.onnx")


@pytest.mark.parametrize("variant,family", [("mha", "lm"), ("reuse", "lm")])
def test_static_fp16_exports_fuse(variant, family, tmp_path):
    source = source_of(variant, family)
    optimised, _ = optimize_model(export(source, "fp16", stock=True, static=True), target="ort", native=False)
    expected = {MHA: 2} if variant == "mha" else {"ai.attn2onnx::ProbAttention": 1, MHA: 1}
    assert fused_ops(optimised) == expected
    assert_parity(optimised, source, "fp16", [(2, 8)], tmp_path / "static.onnx")
