"""Fuse super attention's left token mix written in plain PyTorch into one ``ai.attn2onnx::SuperMix``.

The pattern is ``WA[:T,:T] @ x`` (optionally ``tril(WA[:T,:T])`` and ``x * mask[..., None]``), with
WA a constant [Lmax, Lmax]: one SuperMix node per layer, whatever the number of heads. Without a
padding mask in the pattern the node gets an all-true mask (exactly the same computation).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from ._ir_utils import (
    DOMAIN,
    Builder,
    FusionPass,
    attr,
    axes_of,
    const_array,
    const_ints,
    dims,
    ensure_function,
    fuse_each,
    norm_axes,
    producer,
    replace_value,
    same_dim,
)
from ._match import all_true_mask

logger = logging.getLogger(__name__)


def _is_length_of(ends: ir.Value, x: ir.Value) -> bool:
    """ends = Shape(y, start=1, end=2) with y's axis 1 the same symbol as x's axis 1."""
    node = producer(ends, "Shape")
    if node is None or attr(node, "start", 0) != 1 or attr(node, "end") != 2:
        return False
    dy, dx = dims(node.inputs[0]), dims(x)
    return dy is not None and dx is not None and len(dy) >= 2 and same_dim(dy[1], dx[1])


def _slice_is_leading(node: ir.Node, x: ir.Value) -> list[int] | None:
    """The axes of a Slice that keeps the first T (x's axis 1) entries of one or both axes; None
    for any other Slice."""
    starts, ends = node.inputs[1], node.inputs[2]
    axes = const_ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
    steps = node.inputs[4] if len(node.inputs) > 4 else None
    if axes is None or const_ints(starts) != [0] * len(axes):
        return None
    if steps is not None and const_ints(steps) != [1] * len(axes):
        return None
    if len(axes) == 1:
        return axes if _is_length_of(ends, x) else None
    concat = producer(ends, "Concat")
    if len(axes) != 2 or concat is None or len(concat.inputs) != 2:
        return None
    return axes if all(_is_length_of(e, x) for e in concat.inputs) else None


def _leading_square(m: ir.Value, x: ir.Value) -> ir.Value | None:
    """m = W[:T, :T] of a constant square W (one Slice over both axes or one per axis), or W itself
    where x's T is static and equal to its size (a static export) -> W."""
    sliced: set[int] = set()
    cur = m
    while (node := producer(cur, "Slice")) is not None:
        axes = _slice_is_leading(node, x)
        if axes is None:
            return None
        sliced.update(a % 2 for a in axes)
        cur = node.inputs[0]
    w = const_array(cur)
    if w is None or w.ndim != 2 or w.shape[0] != w.shape[1]:
        return None
    whole = not sliced and dims(x) is not None and dims(x)[1] == w.shape[0]  # static T = Lmax: W[:T,:T] is W
    return cur if sliced == {0, 1} or whole else None


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


def _causal_of(m: ir.Value) -> tuple[ir.Value, int] | None:
    """m = tril(inner) (lower, k = 0) -> (inner, 1); no Trilu -> (m, 0); any other Trilu -> None."""
    tril = producer(m, "Trilu")
    if tril is None:
        return m, 0
    k = const_array(tril.inputs[1]) if len(tril.inputs) > 1 and tril.inputs[1] is not None else np.array(0)
    if attr(tril, "upper", 1) != 0 or k is None or int(k) != 0:
        return None
    return tril.inputs[0], 1


def _fuse_mix(model: ir.Model, node: ir.Node) -> bool:
    """node = [tril](W[:T,:T]) @ x [* mask] -> SuperMix(x, W, mask)."""
    m, x = node.inputs
    dx = dims(x)
    found = _causal_of(m) if dx is not None and len(dx) == 3 else None
    if found is None:
        return False
    m, causal = found
    src, mask = _masked_rows(x)
    w = _leading_square(m, src)
    if w is None or not ensure_function(model, "SuperMix"):
        return False
    b = Builder(node, "super")
    if mask is None:
        mask = all_true_mask(b, src, dx[:2])
    out = b.op(
        "SuperMix", [src, w, mask], {"causal": causal}, domain=DOMAIN, dtype=src.dtype, shape=dims(node.outputs[0])
    )
    replace_value(node.outputs[0], out)
    logger.debug("SuperMix (causal=%d) replaces MatMul %r", causal, node.name)
    return True


def fuse_super_mix(model: ir.Model) -> int:
    """Replace each plain-PyTorch super token mix by a SuperMix node; how many were made."""
    return fuse_each(model, "SuperMix", lambda n: n.op_type == "MatMul" and n.domain == "", _fuse_mix)


class FuseSuperMixPass(FusionPass):
    """Plain super token mixes -> SuperMix."""

    op_type = "SuperMix"

    def fuse(self, model: ir.Model) -> int:
        return fuse_super_mix(model)
