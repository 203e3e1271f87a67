"""Fused rotary embeddings made right at every batch size.

onnxscript's ORT fusions (:mod:`.ort_stage`) turn Hugging Face's ``x * cos + rotate_half(x) * sin``
into a ``RotaryEmbedding`` node. Hugging Face computes cos / sin from ``position_ids`` of shape
[1, T] (the same positions for every row) and lets the multiplication broadcast them over the
batch; the fused node does not broadcast: ONNX ``RotaryEmbedding`` (opset 23) without
``position_ids`` wants caches of [B, T, rotary/2], and ``com.microsoft.RotaryEmbedding`` wants
``position_ids`` of [B, T] (or a rank-1 offset). With the [1, T] operand the graph runs at batch 1
and fails at batch 2 ("cos_cache and sin_cache are expected to have the same shape as input x").

:func:`broadcast_rotary_batch` keeps the fusion and expands such an operand, whose batch dim is
not provably the input's, to the input's batch (``Expand``: a copy of [B, T, rotary/2] per run,
shared by every node that reads the same operand at the same batch; a no-op in value where the
operand had the batch already). An operand known to be at the batch, or of rank 1, is left alone.
"""

from __future__ import annotations

import onnx_ir as ir

from ._ir_utils import Builder, dims, same_dim, scope_nodes

_ONNX_DOMAINS = ("", "ai.onnx")


def _batch_operands(node: ir.Node) -> tuple[tuple[int, bool], ...]:
    """(index, rank known to be >= 2 by the op's contract) of each input of ``node`` that must
    carry the batch of input 0; none for other ops."""
    if node.op_type != "RotaryEmbedding":
        return ()
    if node.domain == "com.microsoft":  # input, position_ids [B, T] or a [1] offset, cos_cache, sin_cache
        return ((1, False),)
    if node.domain in _ONNX_DOMAINS:  # X, cos_cache, sin_cache, position_ids?
        has_positions = len(node.inputs) > 3 and node.inputs[3] is not None
        return ((3, True),) if has_positions else ((1, True), (2, True))
    return ()


def _may_lack_batch(operand: ir.Value, x: ir.Value, rank_at_least_2: bool) -> bool:
    """``operand`` may be [1, ...] where ``x`` is [B, ...]: not provably at x's batch already. The
    exporter's optimiser leaves the caches it computes without shapes, so unknown counts as may."""
    operand_dims, x_dims = dims(operand), dims(x)
    if x_dims and x_dims[0] == 1:
        return False
    if operand_dims is None:
        return rank_at_least_2
    return len(operand_dims) >= 2 and not same_dim(operand_dims[0], x_dims[0] if x_dims else None)


def broadcast_rotary_batch(model: ir.Model) -> int:
    """Expand every fused rotary operand that is [1, ...] to its input's batch; how many were expanded."""
    expanded: dict[tuple[int, int, object], ir.Value] = {}  # (graph, operand, batch dim) -> expanded
    count = 0
    for node in list(scope_nodes(model)):
        x = node.inputs[0] if node.inputs else None
        for index, rank_at_least_2 in _batch_operands(node):
            operand = node.inputs[index] if index < len(node.inputs) else None
            if x is None or operand is None or not _may_lack_batch(operand, x, rank_at_least_2):
                continue
            batch_dim = dims(x)[0] if dims(x) else None
            key = (id(node.graph), id(operand), batch_dim)
            if batch_dim is None or key not in expanded:
                b = Builder(node, "rotary_batch")
                batch = b.op("Shape", [x], {"start": 0, "end": 1}, dtype=ir.DataType.INT64, shape=[1])
                rest = b.op("Shape", [operand], {"start": 1}, dtype=ir.DataType.INT64)
                target = b.op("Concat", [batch, rest], {"axis": 0}, dtype=ir.DataType.INT64)
                shape = None if dims(operand) is None else [batch_dim, *dims(operand)[1:]]
                expanded[key] = b.op("Expand", [operand, target], dtype=operand.dtype, shape=shape)
                count += 1
            node.replace_input_with(index, expanded[key])
    return count
