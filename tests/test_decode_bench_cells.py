"""The decode benchmark's own pieces (benchmarks/_decode_cells.py, used by benchmarks/generate.py):
the eager static-cache baseline must compute what the growing-cache step computes, and the
floor must count the weights a step reads. Small models, direct calls."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _decode_cells import StaticCacheLM, build, greedy_tokens, onnx_weight_bytes  # noqa: E402

from attn2onnx.models.decode import DecodeLM  # noqa: E402


@pytest.mark.parametrize("variant", ["mha", "dcmha"])
def test_static_cache_step_equals_growing_step(variant: str) -> None:
    """Logits of a prefill and four single-token steps with the static cache (in-place writes
    into a buffer longer than the sequence, attention over the valid prefix) equal DecodeLM's
    (caches grown by concatenation), and so do 12 greedy tokens."""
    torch.manual_seed(0)
    model = build(variant, 64, d_model=32, heads=4, layers=2)
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(1))
    static = StaticCacheLM(model).eval()
    static.allocate(2, 32)
    growing, past = DecodeLM(model).eval(), DecodeLM(model).empty_past(2)
    done = 0
    with torch.inference_mode():
        for _ in range(5):
            seq = ids.shape[1]
            mask = torch.ones(2, done + seq, dtype=torch.int64)
            positions = torch.arange(done, done + seq).expand(2, seq)
            want, *past = growing(ids, mask, positions, *past)
            got = static(ids)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            done += seq
            ids = want[:, -1:].argmax(-1)
    assert static.length == done
    assert torch.equal(greedy_tokens(model, ids, 12, static=True), greedy_tokens(model, ids, 12, static=False))


def test_static_cache_refuses_other_variants() -> None:
    model = build("efficient", 64, d_model=32, heads=4, layers=1)
    with pytest.raises(ValueError, match="covers mha, dcmha"):
        StaticCacheLM(model)


def test_weight_bytes_leave_out_gathered_tables(tmp_path: Path) -> None:
    """A table the graph only gathers rows of (positions) is not read whole by a step; a weight a
    MatMul reads is, at its stored width (uint8 here)."""
    table = numpy_helper.from_array(np.zeros((100, 8), np.float32), "table")
    weight = numpy_helper.from_array(np.zeros((8, 4), np.uint8), "weight")
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["rows"]),
        helper.make_node("Cast", ["weight"], ["w"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["rows", "w"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [table, weight],
    )
    onnx.save(helper.make_model(graph), tmp_path / "g.onnx")
    assert onnx_weight_bytes(tmp_path / "g.onnx") == 8 * 4
