"""Fused rotary embeddings at every batch size (issue 20: a Llama .pt2 crashed export's own check at
batch 2). Hugging Face computes cos / sin from position_ids [1, T]; the exporter's optimiser (opset
23) and onnxscript's ORT fusions fuse ``x * cos + rotate_half(x) * sin`` into ``RotaryEmbedding``,
which does not broadcast a batch of 1. passes/rotary_batch.py expands such operands to the batch."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto as TP
from torch import nn

from attn2onnx.exporter import to_onnx
from attn2onnx.io_spec import InputSpec
from attn2onnx.passes.legalize import legalize
from attn2onnx.passes.rotary_batch import broadcast_rotary_batch

HEADS, HEAD_DIM, MAX_POS = 2, 8, 32


def rotary_reference(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Non-interleaved rotary on x [B, N, T, H] with cos / sin [B|1, T, H/2], in float64."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(np.float64), x[..., half:].astype(np.float64)
    c, s = cos[:, None].astype(np.float64), sin[:, None].astype(np.float64)
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def caches(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    angles = np.random.default_rng(seed).uniform(0, 6, (1, MAX_POS, HEAD_DIM // 2)).astype(np.float32)
    return np.cos(angles), np.sin(angles)


def onnx_rotary_model() -> onnx.ModelProto:
    """RotaryEmbedding-23 without position_ids whose caches are sliced to [1, T, H/2] from
    constants, with no shape recorded for them (as the exporter's optimiser leaves them)."""
    cos, sin = caches()
    nodes = [
        oh.make_node("Shape", ["x"], ["seq"], start=2, end=3),
        oh.make_node("Slice", ["cos_table", "zero", "seq", "one"], ["cos"]),
        oh.make_node("Slice", ["sin_table", "zero", "seq", "one"], ["sin"]),
        oh.make_node("RotaryEmbedding", ["x", "cos", "sin"], ["y"], num_heads=HEADS),
    ]
    init = [
        onnx.numpy_helper.from_array(cos, "cos_table"),
        onnx.numpy_helper.from_array(sin, "sin_table"),
        onnx.numpy_helper.from_array(np.array([0], np.int64), "zero"),
        onnx.numpy_helper.from_array(np.array([1], np.int64), "one"),
    ]
    graph = oh.make_graph(
        nodes,
        "rotary",
        [oh.make_tensor_value_info("x", TP.FLOAT, ["batch", HEADS, "seq", HEAD_DIM])],
        [oh.make_tensor_value_info("y", TP.FLOAT, ["batch", HEADS, "seq", HEAD_DIM])],
        initializer=init,
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 23)])


def run(model: onnx.ModelProto, **feeds: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def repaired(model: onnx.ModelProto) -> onnx.ModelProto:
    irm = ir.serde.deserialize_model(model)
    assert broadcast_rotary_batch(irm) == 2  # one Expand for cos, one for sin
    return ir.serde.serialize_model(irm)


def test_onnx_rotary_fails_at_batch_2_unrepaired() -> None:
    """The defect itself: ONNX Runtime refuses batch-1 caches for a batch-2 input."""
    x = np.random.default_rng(1).standard_normal((2, HEADS, 5, HEAD_DIM)).astype(np.float32)
    with pytest.raises(Exception, match="cos_cache"):
        run(onnx_rotary_model(), x=x)


@pytest.mark.parametrize("batch,seq", [(1, 5), (2, 5), (3, 17)])
def test_onnx_rotary_runs_at_every_batch(batch: int, seq: int) -> None:
    cos, sin = caches()
    x = np.random.default_rng(batch).standard_normal((batch, HEADS, seq, HEAD_DIM)).astype(np.float32)
    got = run(repaired(onnx_rotary_model()), x=x)
    want = rotary_reference(x, cos[:, :seq], sin[:, :seq])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_operand_known_at_batch_is_left_alone() -> None:
    """Caches already [batch, T, H/2] (same symbol as the input's batch) need no Expand."""
    graph = oh.make_graph(
        [oh.make_node("RotaryEmbedding", ["x", "cos", "sin"], ["y"], num_heads=HEADS)],
        "rotary",
        [
            oh.make_tensor_value_info("x", TP.FLOAT, ["batch", HEADS, "seq", HEAD_DIM]),
            oh.make_tensor_value_info("cos", TP.FLOAT, ["batch", "seq", HEAD_DIM // 2]),
            oh.make_tensor_value_info("sin", TP.FLOAT, ["batch", "seq", HEAD_DIM // 2]),
        ],
        [oh.make_tensor_value_info("y", TP.FLOAT, ["batch", HEADS, "seq", HEAD_DIM])],
    )
    irm = ir.serde.deserialize_model(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 23)]))
    assert broadcast_rotary_batch(irm) == 0


def test_ms_rotary_offset_position_is_left_alone() -> None:
    """com.microsoft.RotaryEmbedding's rank-1 position offset broadcasts by contract: untouched."""
    graph = oh.make_graph(
        [oh.make_node("RotaryEmbedding", ["x", "pos", "cos", "sin"], ["y"], domain="com.microsoft", num_heads=HEADS)],
        "rotary",
        [
            oh.make_tensor_value_info("x", TP.FLOAT, ["batch", "seq", HEADS * HEAD_DIM]),
            oh.make_tensor_value_info("pos", TP.INT64, [1]),
            oh.make_tensor_value_info("cos", TP.FLOAT, [MAX_POS, HEAD_DIM // 2]),
            oh.make_tensor_value_info("sin", TP.FLOAT, [MAX_POS, HEAD_DIM // 2]),
        ],
        [oh.make_tensor_value_info("y", TP.FLOAT, ["batch", "seq", HEADS * HEAD_DIM])],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 23), oh.make_opsetid("com.microsoft", 1)])
    assert broadcast_rotary_batch(ir.serde.deserialize_model(model)) == 0


# -- the real exporter on Hugging Face's rotary code -----------------------------------------------
def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """As transformers' modeling_llama writes it."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


class HfRotary(nn.Module):
    """Llama's rotary path: inv_freq @ position_ids [1, T] -> cos / sin [1, T, H], applied to
    q [B, N, T, H] with cos.unsqueeze(1) broadcasting over the batch."""

    def __init__(self) -> None:
        super().__init__()
        inv_freq = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.proj = nn.Linear(HEADS * HEAD_DIM, HEADS * HEAD_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.proj(x).view(batch, seq, HEADS, HEAD_DIM).transpose(1, 2)
        position_ids = torch.arange(seq, device=x.device).unsqueeze(0)
        inv = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
        freqs = (inv @ position_ids[:, None, :].float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().unsqueeze(1), emb.sin().unsqueeze(1)
        return q * cos + rotate_half(q) * sin


@pytest.mark.parametrize("batch,seq", [(2, 6), (3, 11)])
def test_exported_hf_rotary_runs_past_batch_1(batch: int, seq: int) -> None:
    """The stock export path (legalize runs right after torch.onnx.export) at a batch > 1."""
    torch.manual_seed(0)
    model = HfRotary().eval()
    specs = [InputSpec("x", ("batch", "seq", HEADS * HEAD_DIM), "float")]
    proto = to_onnx(model, [torch.randn(2, 6, HEADS * HEAD_DIM)], specs)
    x = torch.randn(batch, seq, HEADS * HEAD_DIM)
    got = run(proto, x=x.numpy())
    np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_legalize_expands_rotary_caches() -> None:
    """legalize() (the exporter's and every optimize target's first step) includes the repair."""
    irm = ir.serde.deserialize_model(onnx_rotary_model())
    legalize(irm)
    assert any(node.op_type == "Expand" for node in irm.graph)
