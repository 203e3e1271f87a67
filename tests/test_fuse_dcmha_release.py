"""DCMHA as the DCFormer release writes it (tests/corpus_dcformer/release_style.py) fuses into one
DcmhaAttention per layer under ``optimize --target ort``: the group-axis einsums, the rank loop
of einsums (and the fast_infer=False pair), the sw mix, query-wise mode, QK-norm and RoPE
upstream, the mask sliced from a precomputed causal / window buffer. The fused graph computes
what the stock export computes at two dynamic shapes; masks and fills that are not causal /
window by construction stay unfused."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from corpus_dcformer.release_style import MaskedLayer, release_layer, release_lm
from dcformer_release import random_release_state, release_forward
from plain_dcmha import run_ort

import attn2onnx
from attn2onnx.passes import optimize_model
from attn2onnx.passes._ir_utils import count_ops
from attn2onnx.passes.explain import explain

BASE = dict(vocab_size=64, n_head=4, dim=32, rope_base=10000.0)
LAYERS = {  # name -> (config, fast_infer, layer index)
    "causal_sw_qknorm": (dict(BASE, n_layer=2, window_size=None, use_sw=True, use_qk_norm=True), True, 0),
    "window_rank_axis_query_wise": (dict(BASE, n_layer=1, window_size=3, query_wise=True), False, 0),
}
SHAPES = [(1, 5), (2, 11)]
ATTENTION = "ai.attn2onnx::DcmhaAttention"


def _counts(model: onnx.ModelProto) -> dict[str, int]:
    return count_ops(ir.serde.deserialize_model(model))


def _attention_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == "ai.attn2onnx" and n.op_type == "DcmhaAttention"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Exports as a user makes them (attn2onnx.export, dims inferred by size), once per case."""
    folder = tmp_path_factory.mktemp("release")
    cache: dict[str, onnx.ModelProto] = {}

    def get(name: str) -> onnx.ModelProto:
        if name not in cache:
            if name == "lm":
                config = dict(BASE, n_layer=2, window_size=4)
                module = release_lm(config, random_release_state(config, seed=3), max_len=32)
                example = (torch.randint(0, 64, (2, 9)),)
            else:
                config, fast_infer, lidx = LAYERS[name]
                layer = release_layer(config, random_release_state(config, seed=2), lidx, fast_infer)
                module, example = MaskedLayer(layer, config["rope_base"], 32).eval(), (torch.randn(2, 9, 32),)
            path = folder / f"{name}.onnx"
            attn2onnx.export(module, example, path)
            cache[name] = onnx.load(path)
        return cache[name]

    return get


def _feeds(model: onnx.ModelProto, batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    (x,) = model.graph.input
    if x.type.tensor_type.elem_type == onnx.TensorProto.INT64:
        return {x.name: rng.integers(0, 64, (batch, seq))}
    return {x.name: rng.standard_normal((batch, seq, 32)).astype(np.float32)}


def _assert_same(stock: onnx.ModelProto, fused: onnx.ModelProto) -> None:
    for i, (batch, seq) in enumerate(SHAPES):
        feeds = _feeds(stock, batch, seq, i)
        np.testing.assert_allclose(run_ort(fused, feeds), run_ort(stock, feeds), atol=2e-5, rtol=1e-4)


def test_release_style_computes_the_release_forward():
    """The release-style LM (both compose forms) loads the release layout and matches the oracle."""
    config = dict(BASE, n_layer=2, window_size=3, use_sw=True, use_qk_norm=True)
    state = random_release_state(config, seed=1)
    ids = torch.randint(0, 64, (2, 9))
    expected = release_forward(config, state, ids)
    for fast_infer in (True, False):
        with torch.no_grad():
            got = release_lm(config, state, max_len=16, fast_infer=fast_infer)(ids)
        torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", list(LAYERS))
def test_release_layer_fuses_into_one_dcmha_attention(exported, name):
    stock = exported(name)
    assert "Einsum" in _counts(stock)
    fused, _ = optimize_model(stock, target="ort")
    counts = _counts(fused)
    assert counts.get(ATTENTION) == 1, counts
    assert "Softmax" not in counts and "ai.attn2onnx::DcmhaCompose" not in counts, counts
    (node,) = _attention_nodes(fused)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    config = LAYERS[name][0]
    assert attrs["causal"] == 1
    assert attrs["window"] == (config["window_size"] + 1 if config["window_size"] else 0)  # the release's W + 1 keys
    assert attrs["use_static_mix"] == int(config.get("use_sw", False))
    _assert_same(stock, fused)
    outcomes = explain(stock, target="ort")  # the release's compose sums hide the q.k product behind Squeeze / Add
    assert len(outcomes) == 1 and outcomes[0].fused, outcomes


def test_release_lm_fuses_one_dcmha_attention_per_layer(exported):
    """Window layer and global layer take their rows of one stacked [window, causal] buffer."""
    stock = exported("lm")
    fused, _ = optimize_model(stock, target="ort")
    windows = sorted(
        onnx.helper.get_attribute_value(a) for n in _attention_nodes(fused) for a in n.attribute if a.name == "window"
    )
    assert windows == [0, 5], windows
    _assert_same(stock, fused)


def _with_table(model: onnx.ModelProto, change) -> onnx.ModelProto:
    """A copy of ``model`` whose boolean initializer (the mask buffer) is changed by ``change``."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.BOOL:
            table = onnx.numpy_helper.to_array(init).copy()
            change(table)
            init.CopyFrom(onnx.numpy_helper.from_array(table, init.name))
            return model
    raise AssertionError("no mask buffer")


def _hole(table: np.ndarray) -> None:
    table.reshape(-1, table.shape[-1])[3, 1] = False  # one allowed key of query 3 masked


def _future(table: np.ndarray) -> None:
    table.reshape(-1, table.shape[-1])[1, 2] = True  # query 1 sees key 2


def _with_fill(model: onnx.ModelProto, fill: float) -> onnx.ModelProto:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    where = next(n for n in model.graph.node if n.op_type == "Where")
    for init in model.graph.initializer:
        if init.name == where.input[2]:
            init.CopyFrom(onnx.numpy_helper.from_array(np.array(fill, dtype=np.float32), init.name))
            return model
    raise AssertionError("fill is not an initializer")


@pytest.mark.parametrize("near_miss", ["hole", "future_key", "small_fill"])
def test_near_misses_fuse_only_as_attn_mask(exported, near_miss):
    """A fill that does not mask: no DcmhaAttention. A buffer that is not a band is no causal /
    window mask: its slice becomes the op's attn_mask input (causal 0). Same outputs either way."""
    stock = exported("causal_sw_qknorm")
    changed = {
        "hole": lambda: _with_table(stock, _hole),
        "future_key": lambda: _with_table(stock, _future),
        "small_fill": lambda: _with_fill(stock, -100.0),
    }[near_miss]()
    fused, _ = optimize_model(changed, target="ort")
    nodes = _attention_nodes(fused)
    if near_miss == "small_fill":
        assert not nodes
    else:
        (node,) = nodes
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert len(node.input) == 8 and node.overload == "attn_mask" and attrs["causal"] == 0
    _assert_same(changed, fused)
