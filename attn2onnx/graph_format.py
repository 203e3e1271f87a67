"""What an attn2onnx graph file carries beyond plain ONNX, without torch: the metadata keys that
export writes besides the inputs' (``attn2onnx.inputs``: :mod:`attn2onnx.io_spec`) and the
decode graph's contract (its three int64 inputs, its cache tensors).

The writers (:mod:`attn2onnx.exporter`, :mod:`attn2onnx.models.decode`) need torch; the readers
(:mod:`attn2onnx.runtime.metadata`, ``run``, ``generate``) must not, so the shared names live here.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_SEQ_KEY = "attn2onnx.max_seq"  # metadata: the longest sequence the model takes (run checks inputs against it)
DECODE_KEY = "attn2onnx.decode"  # metadata: JSON description of the decode graph (models.decode.decode_metadata)
INPUTS = ("input_ids", "attention_mask", "position_ids")  # a decode graph's inputs before its caches


@dataclass(frozen=True)
class CacheSpec:
    """One cache tensor of the decode graph: layer, input / output names, dims (ints and dim
    names), what it holds, and the most positions it keeps (None: all)."""

    layer: int
    input: str
    output: str
    dims: tuple[int | str, ...]
    holds: str
    limit: int | None

    def shape(self, batch: int, past: int) -> tuple[int, ...]:
        """Concrete shape for ``batch`` sequences after ``past`` positions."""
        kept = past if self.limit is None else min(past, self.limit)
        return tuple(batch if d == "batch" else kept if isinstance(d, str) else d for d in self.dims)


def past_dim(limit: int | None) -> str:
    """Name of a cache's past dim: ``past``, or ``past_window{L}`` for a layer keeping L positions."""
    return "past" if limit is None else f"past_window{limit}"
