"""Fuse other decomposed patterns into ``ai.attn2onnx`` ops.

* super attention's left token mix written in plain PyTorch, ``WA[:T,:T] @ x`` (optionally
  ``tril(WA[:T,:T])`` and ``x * mask[..., None]``), with WA a constant [Lmax, Lmax] -> one
  SuperMix node (computed once per layer, whatever the number of heads). Without a padding
  mask in the pattern the node gets an all-true mask (exactly the same computation).

Not fused yet (see the report in the issue): iMHSA head mixing and reuse probability passing;
their ops (LandmarkAttention, ProbAttention) come from the variant modules' own export.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ._ir_utils import (
    DOMAIN,
    Builder,
    attr,
    axes_of,
    const_array,
    const_ints,
    dims,
    ensure_function,
    norm_axes,
    op_available,
    producer,
    replace_value,
    same_dim,
)


def _is_length_of(ends: ir.Value, x: ir.Value) -> bool:
    """ends = Shape(y, start=1, end=2) with y's axis 1 the same symbol as x's axis 1."""
    node = producer(ends, "Shape")
    if node is None or attr(node, "start", 0) != 1 or attr(node, "end") != 2:
        return False
    dy, dx = dims(node.inputs[0]), dims(x)
    return dy is not None and dx is not None and len(dy) >= 2 and same_dim(dy[1], dx[1])


def _leading_square(m: ir.Value, x: ir.Value) -> ir.Value | None:
    """m = W[:T, :T] of a constant square W (one Slice over both axes or one per axis) -> W."""
    sliced: set[int] = set()
    cur = m
    while True:
        node = producer(cur, "Slice")
        if node is None:
            break
        starts, ends, axes = node.inputs[1], node.inputs[2], node.inputs[3] if len(node.inputs) > 3 else None
        steps = node.inputs[4] if len(node.inputs) > 4 else None
        ax = const_ints(axes) if axes is not None else None
        if ax is None or const_ints(starts) != [0] * len(ax) or (steps is not None and const_ints(steps) != [1] * len(ax)):
            return None
        if len(ax) == 1 and not _is_length_of(ends, x):
            return None
        if len(ax) == 2:
            concat = producer(ends, "Concat")
            if concat is None or len(concat.inputs) != 2 or not all(_is_length_of(e, x) for e in concat.inputs):
                return None
        sliced.update(a % 2 for a in ax)
        cur = node.inputs[0]
    w = const_array(cur)
    if sliced != {0, 1} or w is None or w.ndim != 2 or w.shape[0] != w.shape[1]:
        return None
    return cur


def _masked_rows(x: ir.Value) -> tuple[ir.Value, ir.Value | None]:
    """x = src * Cast(Unsqueeze(mask [B,T], -1)) -> (src, mask); anything else -> (x, None)."""
    node = producer(x, "Mul")
    if node is not None:
        for src, m in (node.inputs, node.inputs[::-1]):
            cast = producer(m, "Cast")
            unsq = producer(cast.inputs[0] if cast is not None else None, "Unsqueeze")
            if unsq is None or unsq.inputs[0].dtype != ir.DataType.BOOL:
                continue
            axes = axes_of(unsq)
            if axes is not None and norm_axes(axes, 3) == [2] and dims(src) is not None and len(dims(src)) == 3:
                return src, unsq.inputs[0]
    return x, None


def fuse_super_mix(model: ir.Model) -> int:
    if not op_available("SuperMix"):
        return 0
    graph = model.graph
    count = 0
    for node in list(graph):
        if node.op_type != "MatMul" or node.domain != "":
            continue
        m, x = node.inputs
        dx = dims(x)
        if dx is None or len(dx) != 3:
            continue
        tril = producer(m, "Trilu")
        causal = 0
        if tril is not None:
            k = const_array(tril.inputs[1]) if len(tril.inputs) > 1 and tril.inputs[1] is not None else np.array(0)
            if attr(tril, "upper", 1) != 0 or k is None or int(k) != 0:
                continue
            m, causal = tril.inputs[0], 1
        src, mask = _masked_rows(x)
        w = _leading_square(m, src)
        if w is None:
            continue
        b = Builder(graph, node, "super")
        if mask is None:
            shape = b.op("Shape", [src], {"start": 0, "end": 2}, dtype=ir.DataType.INT64, shape=(2,))
            mask = b.op("Expand", [b.const(np.array(True), "true"), shape], dtype=ir.DataType.BOOL, shape=dx[:2])
        out = b.op("SuperMix", [src, w, mask], {"causal": causal}, domain=DOMAIN, dtype=src.dtype, shape=dims(node.outputs[0]))
        replace_value(node.outputs[0], out)
        count += 1
    if count:
        ensure_function(model, "SuperMix")
        ir.passes.common.RemoveUnusedNodesPass()(model)
    return count


class FuseMiscPass(ir.passes.InPlacePass):
    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        mixes = fuse_super_mix(model)
        self.counts = {"SuperMix": mixes}
        return ir.passes.PassResult(model, bool(mixes))
