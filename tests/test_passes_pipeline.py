"""The optimize API: targets, file writing (atomic, external data), reports, cleanup."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from plain_dcmha import STYLES, export_stock, random_feeds, run_ort

import attn2onnx.onnx_io as onnx_io
from attn2onnx.errors import UsageError
from attn2onnx.passes import OptimizeError, build_passes, optimize, optimize_model
from attn2onnx.passes.cleanup import CleanupPass

D = 32


@pytest.fixture(scope="module")
def plain_path(tmp_path_factory) -> str:
    torch.manual_seed(0)
    module = STYLES["dcformer"](d_model=D, n_heads=4, causal=True, seed=3)
    return export_stock(module, D, str(tmp_path_factory.mktemp("pipeline") / "plain.onnx"))


def test_optimize_writes_a_working_model(plain_path, tmp_path):
    out = tmp_path / "sub" / "fused.onnx"
    with pytest.raises(FileNotFoundError, match="does not exist"):  # a missing output folder is never created
        optimize(plain_path, out, target="ort")
    out.parent.mkdir()
    report = optimize(plain_path, out, target="ort")
    assert out.exists() and sorted(os.listdir(out.parent)) == ["fused.onnx"]  # no temp files left
    assert report.after.ops.get("ai.attn2onnx::DcmhaAttention") == 1
    assert report.after.nodes < report.before.nodes
    assert "DcmhaAttention x1" in str(report) and report.to_dict()["target"] == "ort"
    onnx.checker.check_model(str(out), full_check=True)
    feeds = random_feeds(2, 7, D)
    np.testing.assert_allclose(run_ort(str(out), feeds), run_ort(plain_path, feeds), atol=1e-4, rtol=1e-4)


def test_optimize_in_place_with_external_data(plain_path, tmp_path, monkeypatch):
    """Over the protobuf limit (lowered here to 0 bytes) the weights go to <out>.data; writing
    over the input file is safe."""
    path = tmp_path / "model.onnx"
    path.write_bytes(open(plain_path, "rb").read())
    monkeypatch.setattr(onnx_io, "PROTOBUF_LIMIT", 0)
    optimize(path, path, target="portable")
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "model.onnx.data"]
    monkeypatch.setattr(onnx_io, "PROTOBUF_LIMIT", 2 * 1024**3)
    optimize(path, path, target="portable")  # input with external data keeps it external
    assert (tmp_path / "model.onnx.data").exists()
    feeds = random_feeds(1, 6, D)
    np.testing.assert_allclose(run_ort(str(path), feeds), run_ort(plain_path, feeds), atol=1e-4, rtol=1e-4)


def test_model_kinds_and_errors(plain_path, tmp_path):
    proto = onnx.load(plain_path)
    out, _ = optimize_model(proto, target="trt")
    assert isinstance(out, onnx.ModelProto)
    model = ir.load(plain_path)
    same, _ = optimize_model(model, target="portable")
    assert same is model
    with pytest.raises(OptimizeError, match="unknown target"):
        optimize_model(proto, target="gpu")
    with pytest.raises(FileNotFoundError, match="no such file"):
        optimize(tmp_path / "missing.onnx", tmp_path / "o.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(UsageError, match="not a readable ONNX model"):
        optimize(bad, tmp_path / "o.onnx")


def test_targets_compose_passes():
    names = {t: [n for n, _ in build_passes(t)] for t in ("ort", "trt", "portable")}
    for t, passes in names.items():
        assert passes[:2] == ["legalize", "cleanup"] and "fuse_dcmha" in passes and "lower_attention" in passes
    assert names["trt"][-1] == "trt_plugins"


def test_cleanup_never_inlines_or_rewrites_bodies(plain_path):
    fused, _ = optimize_model(onnx.load(plain_path), target="portable")
    model = ir.serde.deserialize_model(fused)
    bodies = {key: onnx.printer.to_text(ir.serde.serialize_function(f)) for key, f in model.functions.items()}
    CleanupPass()(model)
    assert any(n.op_type == "DcmhaAttention" for n in model.graph)
    assert {key: onnx.printer.to_text(ir.serde.serialize_function(f)) for key, f in model.functions.items()} == bodies
