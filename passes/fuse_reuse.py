"""Fuse reuse probability passing (variants.md §7) into ``ai.attn2onnx::ProbAttention``.

A softmax attention ``softmax(where(allowed, s q k^T, NEG)) @ v`` whose probabilities are used
again (sliced by later layers, concatenated and passed on) becomes one ProbAttention node: its
``o`` replaces the ``@ v`` and its ``probs`` every other use of the softmax. An attention whose
probabilities feed only its ``@ v`` is left to ``lower_attention``.

``nn.MultiheadAttention(need_weights=True)`` computes the same in folded heads: ``softmax(q k^T)``
on [B*H,T,S] (q scaled before the bmm), ``@ v`` [B*H,S,dv], and the probabilities viewed as
[B,H,T,S] for its returned weights (head-averaged by a ReduceMean, or per head), which a later
layer reuses. Unmasked, with a key padding mask and / or a causal attn_mask (torch merges them
into one additive bias), that becomes a ProbAttention on the unfolded heads whose ``probs``
replace the view (:func:`_fuse_folded`); with any other attn_mask it is left as it is.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from ._ir_utils import (
    DOMAIN,
    Builder,
    FusionPass,
    attr,
    const_scalar,
    dims,
    ensure_function,
    fuse_each,
    producer,
    rank,
    replace_value,
    same_dim,
)
from ._match import (
    additive_causal,
    all_true_mask,
    qk_product,
    scaled,
    single_use,
    through_cast,
    transposed,
    uniform_const,
    where_mask,
)

logger = logging.getLogger(__name__)

MASK_FILL = -1e4  # an additive mask's fill at or below this masks (exp underflows to 0), as fuse_standard_attention's


def _value_matmul(probs: ir.Value) -> ir.Node | None:
    """The ``probs @ v`` (v rank 4) among the uses of ``probs``, when it has other uses too."""
    uses = list(probs.uses())
    pv = next(
        (
            u.node
            for u in uses
            if u.node.op_type == "MatMul" and u.node.domain == "" and u.idx == 0 and rank(u.node.inputs[1]) == 4
        ),
        None,
    )
    if pv is None or (len(uses) < 2 and not probs.is_graph_output()):
        return None
    return pv


def _fuse_prob(model: ir.Model, soft: ir.Node) -> bool:
    """softmax(where(allowed, s q k^T, NEG)) whose probabilities are used besides one ``@ v``; in an
    fp16 graph the logits cast up to fp32 before the mask and the probabilities back after the
    Softmax, as ProbAttention computes them."""
    probs = through_cast(soft.outputs[0], upstream=False)
    a_dims = dims(probs)
    if a_dims is None or len(a_dims) != 4 or attr(soft, "axis", -1) % 4 != 3:
        return False
    pv = _value_matmul(probs)
    masked = through_cast(soft.inputs[0], upstream=True)
    if pv is None or not single_use(masked) or (found := where_mask(masked, a_dims)) is None:
        return False
    logits, parts = through_cast(found[0], upstream=True), found[1]
    qk = qk_product(logits) if logits.dtype == probs.dtype else None  # ProbAttention returns q's precision
    dv = dims(pv.inputs[1])
    if qk is None or dv is None or not same_dim(dv[1], a_dims[1]) or not same_dim(dv[2], a_dims[3]):
        return False
    if not ensure_function(model, "ProbAttention"):
        return False
    make_q, make_k, scale = qk
    b = Builder(pv, "reuse")
    q, k, v = make_q(b), make_k(b), transposed(b, pv.inputs[1], [0, 2, 1, 3])
    kpm = parts.get("kpm")
    if kpm is None:
        kpm = all_true_mask(b, k, (a_dims[0], a_dims[3]))
    o, p = b.op(
        "ProbAttention",
        [q, k, v, kpm],
        {"scale": float(scale), "causal": int(parts.get("causal", 0))},
        domain=DOMAIN,
        num_outputs=2,
    )
    o.dtype = p.dtype = probs.dtype
    o.shape = ir.Shape([a_dims[0], a_dims[2], a_dims[1], dv[3]])
    p.shape = ir.Shape(list(a_dims))
    replace_value(pv.outputs[0], transposed(b, o, [0, 2, 1, 3]))
    replace_value(probs, p)
    logger.debug("ProbAttention replaces Softmax %r and MatMul %r", soft.name, pv.name)
    return True


def _folded_uses(probs: ir.Value) -> tuple[ir.Node, ir.Node] | None:
    """probs [B*H,T,S] used exactly twice: ``@ v`` (v [B*H,S,dv]) and a Reshape to [B,H,T,S]
    (H constant) -> (the MatMul, the Reshape)."""
    uses = list(probs.uses())
    pv = [u.node for u in uses if u.node.op_type == "MatMul" and u.node.domain == "" and u.idx == 0]
    view = [u.node for u in uses if u.node.op_type == "Reshape" and u.node.domain == "" and u.idx == 0]
    if len(uses) != 2 or len(pv) != 1 or len(view) != 1 or probs.is_graph_output() or rank(pv[0].inputs[1]) != 3:
        return None
    d3, d4 = dims(probs), dims(view[0].outputs[0])
    if d3 is None or d4 is None or len(d4) != 4 or not isinstance(d4[1], int) or not same_dim(d3[1], d4[2]):
        return None
    n, batch, heads = d3[0], d4[0], d4[1]
    folded = n == batch * heads if isinstance(n, int) and isinstance(batch, int) else same_dim(n, f"{heads}*{batch}")
    return (pv[0], view[0]) if folded else None


def _unfold(b: Builder, x: ir.Value, heads: int, batch, perm: list[int]) -> ir.Value:
    """x [B*H,X,Y] viewed as [B,H,X,Y] (H = ``heads``), then transposed by ``perm``."""
    d = dims(x)
    size = b.op("Shape", [x], {"start": 1}, dtype=ir.DataType.INT64, shape=(2,))
    shape = b.op("Concat", [b.ints([-1, heads], "unfold"), size], {"axis": 0}, dtype=ir.DataType.INT64, shape=(4,))
    x4 = b.op("Reshape", [x, shape], dtype=x.dtype, shape=[batch, heads, d[1], d[2]])
    return transposed(b, x4, perm)


def _merged_padding(bias: ir.Value) -> ir.Value | None:
    """The key padding mask pad [B,S] (True = pad) nn.MultiheadAttention merged into the additive
    bias [B*H,1,S] it adds to the folded logits: Where(pad, -inf, 0) viewed [B,1,1,S], expanded
    over the heads, folded; None for any other bias (a causal or float attn_mask)."""
    fold = producer(bias, "Reshape")
    expand = producer(fold.inputs[0], "Expand") if fold is not None else None
    view = producer(expand.inputs[0], "Reshape") if expand is not None else None
    where = producer(view.inputs[0], "Where") if view is not None else None
    if where is None:
        return None
    pad, fill = where.inputs[0], const_scalar(where.inputs[1])
    dp, dv, db = dims(pad), dims(view.outputs[0]), dims(bias)
    if (
        pad.dtype != ir.DataType.BOOL
        or dp is None
        or len(dp) != 2
        or dv is None
        or len(dv) != 4
        or dv[1:3] != (1, 1)
        or db is None
        or len(db) != 3
        or db[1] != 1
        or fill is None
        or fill > MASK_FILL
        or uniform_const(where.inputs[2]) != 0.0
    ):
        return None
    return pad


def _mask_terms(bias: ir.Value, t_dim, s_dim) -> tuple[ir.Value | None, bool] | None:
    """(key padding mask pad [B,S] or None, causal) of the attn_mask nn.MultiheadAttention adds to
    its folded logits: a merged key padding mask (:func:`_merged_padding`), a causal mask
    (``triu(ones, 1)`` as -inf above the diagonal), or their sum; None for anything else."""
    add = producer(bias, "Add")
    pad, causal = None, False
    for term in add.inputs if add is not None else [bias]:
        if pad is None and (found := _merged_padding(term)) is not None:
            pad = found
        elif not causal and additive_causal(term, t_dim, s_dim, MASK_FILL):
            causal = True
        else:
            return None
    return pad, causal


def _fuse_folded(model: ir.Model, soft: ir.Node) -> bool:
    """nn.MultiheadAttention(need_weights=True)'s core (module docstring) -> a
    ProbAttention on [B,T,H,d] heads: its ``o`` folded back replaces the ``@ v``, its ``probs``
    the [B,H,T,S] view of the probabilities."""
    probs = soft.outputs[0]
    a_dims = dims(probs)
    if a_dims is None or len(a_dims) != 3 or attr(soft, "axis", -1) % 3 != 2 or (found := _folded_uses(probs)) is None:
        return False
    pv, view = found
    logits, masks = soft.inputs[0], (None, False)
    add = producer(logits, "Add")
    if add is not None:  # baddbmm: the merged attn_mask added to the product
        sides = [
            (i, _mask_terms(add.inputs[1 - i], a_dims[1], a_dims[2]))
            for i in (0, 1)
            if producer(scaled(add.inputs[i])[0], "MatMul") is not None
        ]
        side, masks = next(((i, m) for i, m in sides if m is not None), (0, None))
        if masks is None:
            return False
        logits = add.inputs[side]
    pad, causal = masks
    logits, scale = scaled(logits)
    qk = producer(logits, "MatMul")
    if not single_use(soft.inputs[0]) or not single_use(logits) or qk is None:
        return False
    (q, qs), (kt, ks) = scaled(qk.inputs[0]), scaled(qk.inputs[1])
    dq, dk, dv, d4 = dims(q), dims(kt), dims(pv.inputs[1]), dims(view.outputs[0])
    if any(d is None or len(d) != 3 for d in (dq, dk, dv)) or not same_dim(dq[2], dk[1]) or not same_dim(dv[1], dk[2]):
        return False
    if len({probs.dtype, q.dtype, kt.dtype, pv.inputs[1].dtype}) != 1 or not ensure_function(model, "ProbAttention"):
        return False
    batch, heads = d4[0], d4[1]
    b = Builder(pv, "reuse")
    q4 = _unfold(b, q, heads, batch, [0, 2, 1, 3])
    k4 = _unfold(b, kt, heads, batch, [0, 3, 1, 2])
    v4 = _unfold(b, pv.inputs[1], heads, batch, [0, 2, 1, 3])
    shape = (batch, dk[2])
    kpm = all_true_mask(b, k4, shape) if pad is None else b.op("Not", [pad], dtype=ir.DataType.BOOL, shape=shape)
    attrs = {"scale": float(scale * qs * ks), "causal": int(causal)}
    o, p = b.op("ProbAttention", [q4, k4, v4, kpm], attrs, domain=DOMAIN, num_outputs=2)
    o.dtype = p.dtype = probs.dtype
    o.shape = ir.Shape([batch, a_dims[1], heads, dv[2]])
    p.shape = ir.Shape(list(d4))
    heads_first = transposed(b, o, [0, 2, 1, 3])
    size = b.op("Shape", [heads_first], {"start": 2}, dtype=ir.DataType.INT64, shape=(2,))
    shape = b.op("Concat", [b.ints([-1], "fold"), size], {"axis": 0}, dtype=ir.DataType.INT64, shape=(3,))
    replace_value(pv.outputs[0], b.op("Reshape", [heads_first, shape], dtype=o.dtype, shape=list(dims(pv.outputs[0]))))
    replace_value(view.outputs[0], p)
    logger.debug(
        "ProbAttention replaces folded-head Softmax %r, MatMul %r and Reshape %r", soft.name, pv.name, view.name
    )
    return True


def fuse_prob_attention(model: ir.Model) -> int:
    """Replace each probability-producing softmax attention by a ProbAttention node."""
    return fuse_each(
        model,
        "ProbAttention",
        lambda n: n.op_type == "Softmax" and n.domain == "",
        lambda model, soft: _fuse_prob(model, soft) or _fuse_folded(model, soft),
    )


class FuseReusePass(FusionPass):
    """Probability-producing attentions -> ProbAttention."""

    op_type = "ProbAttention"

    def fuse(self, model: ir.Model) -> int:
        return fuse_prob_attention(model)
