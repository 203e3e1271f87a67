"""Export of every variant: one bare ai.attn2onnx node per op with its body attached, dynamic
batch and sequence dims, onnx.checker full_check, and ORT == PyTorch at three dynamic shapes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import attn2onnx.onnx_io as onnx_io
from attn2onnx import custom_ops
from attn2onnx.exporter import export, to_onnx
from attn2onnx.io_spec import random_inputs
from attn2onnx.models import ModelConfig, build_model
from attn2onnx.runtime import session
from attn2onnx.sources import from_module
from attn2onnx.validate import DEFAULT_SHAPES, TorchRunner, compare, ort_runner
from attn2onnx.variants import VARIANTS

# Which op each variant's layer must export as (none: standard ops only).
EXPECTED_OPS = {
    "mha": set(),
    "optimised": set(),
    "efficient": set(),
    "super": {"SuperMix"},
    "dcmha": {"DcmhaAttention"},
    "imhsa": {"LandmarkAttention"},
    "reuse": {"ProbAttention"},
    "bn": {"PooledNormAttention"},
    "sh": {"PooledNormAttention"},
    "bn-sh": {"PooledNormAttention"},
}


def _export(tmp_path, config: ModelConfig):
    model = build_model(config)
    source = from_module(model)
    result = export(
        model,
        source.example_inputs(2, 8),
        tmp_path / "m.onnx",
        specs=source.specs,
        output_names=source.output_names,
        max_seq=source.max_seq,
    )
    return model, source, result


def _check_parity(model, source, path, shapes=DEFAULT_SHAPES):
    comparisons = compare(
        TorchRunner(model, source.specs, source.output_names), {"ort": ort_runner(str(path))}, source.specs, shapes
    )
    assert comparisons and all(c.passed for c in comparisons), comparisons
    return comparisons


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_layer_exports_with_custom_nodes_and_bodies(tmp_path, variant):
    causal = VARIANTS[variant].causal
    options = {"causal": True} if causal else {}
    model, source, result = _export(
        tmp_path, ModelConfig(family="layer", variant=variant, d_model=32, heads=4, max_len=64, options=options)
    )
    proto = onnx.load(str(result.path))
    custom = {n.op_type for n in proto.graph.node if n.domain == custom_ops.DOMAIN}
    assert custom == EXPECTED_OPS[variant]
    assert result.custom_nodes == sum(n.domain == custom_ops.DOMAIN for n in proto.graph.node)
    functions = {f.name for f in proto.functions if f.domain == custom_ops.DOMAIN}
    assert custom <= functions
    for value in proto.graph.input:
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        assert dims[:2] == ["batch", "seq"], (value.name, dims)
    onnx.checker.check_model(str(result.path), full_check=True)
    _check_parity(model, source, result.path)


@pytest.mark.parametrize(
    "family,variant,extra",
    [
        ("lm", "dcmha", {"options": {"rope": True, "qk_norm": True, "window": 4}}),
        ("lm", "reuse", {"layers": 3}),
        ("encoder", "imhsa", {"patch_size": 2, "image_size": 8, "channels": 1}),
        ("encoder", "bn-sh", {}),
    ],
)
def test_families_export_and_match(tmp_path, family, variant, extra):
    config = ModelConfig(family=family, variant=variant, d_model=32, heads=4, max_len=64, **extra)
    model, source, result = _export(tmp_path, config)
    _check_parity(model, source, result.path)


def test_body_fallback_matches_native_kernels(tmp_path):
    """Without the kernel library ORT runs the attached bodies: same outputs."""
    model, source, result = _export(
        tmp_path, ModelConfig(family="lm", variant="dcmha", d_model=32, heads=4, max_len=64)
    )
    feeds = random_inputs(source.specs, 2, 11, seed=3)
    with_bodies = session(str(result.path), native=False).run(None, feeds)[0]
    default = session(str(result.path)).run(None, feeds)[0]
    ids, mask = (torch.from_numpy(feeds[s.name]) for s in source.specs)
    with torch.inference_mode():
        want = model(ids, mask).numpy()
    np.testing.assert_allclose(with_bodies, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(default, want, rtol=1e-4, atol=1e-5)


def test_plain_module_exports_as_standard_ops(tmp_path):
    """A model with no attn2onnx op still exports (no custom domain, no functions)."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    x = torch.randn(2, 5, 8)
    result = export(model, (x,), tmp_path / "plain.onnx")
    proto = onnx.load(str(result.path))
    assert result.custom_nodes == 0 and not proto.functions
    got = session(str(result.path)).run(None, {"input_0": np.ones((3, 7, 8), np.float32)})[0]
    np.testing.assert_allclose(got, model(torch.ones(3, 7, 8)).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_static_export_has_fixed_dims(tmp_path):
    model = build_model(ModelConfig(family="layer", variant="super", d_model=32, heads=4, max_len=64))
    source = from_module(model)
    result = export(
        model,
        source.example_inputs(1, 12),
        tmp_path / "s.onnx",
        specs=source.specs,
        output_names=source.output_names,
        dynamic=False,
    )
    dims = [d.dim_value for d in onnx.load(str(result.path)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 12, 32]


@pytest.mark.parametrize("variant", ["super", "dcmha", "imhsa", "reuse", "bn-sh"])
def test_stock_export_decomposes_our_ops(variant):
    """custom=False: the ops become their references' aten graph; still dynamic and exact."""
    model = build_model(ModelConfig(family="layer", variant=variant, d_model=32, heads=4, max_len=64))
    source = from_module(model)
    proto = to_onnx(
        model,
        source.example_inputs(2, 8),
        source.specs,
        output_names=source.output_names,
        max_seq=source.max_seq,
        custom=False,
    )
    assert not any(n.domain == custom_ops.DOMAIN for n in proto.graph.node) and not proto.functions
    feeds = random_inputs(source.specs, 3, 13, seed=5)
    got = session(proto).run(None, feeds)[0]
    with torch.inference_mode():
        want = model(*(torch.from_numpy(feeds[s.name]) for s in source.specs)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_large_models_use_external_data(tmp_path, monkeypatch):
    """Above protobuf's limit the weights go to <name>.data beside the model (limit lowered here)."""
    monkeypatch.setattr(onnx_io, "PROTOBUF_LIMIT", 1000)
    model, source, result = _export(
        tmp_path, ModelConfig(family="layer", variant="dcmha", d_model=32, heads=4, max_len=64)
    )
    assert (tmp_path / "m.onnx.data").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left
    _check_parity(model, source, result.path, shapes=[(2, 9)])
