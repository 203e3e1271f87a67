"""Fuse reuse probability passing (variants.md §7) into ``ai.attn2onnx::ProbAttention``.

A softmax attention ``softmax(where(allowed, s q k^T, NEG)) @ v`` whose probabilities are used
again (sliced by later layers, concatenated and passed on) becomes one ProbAttention node: its
``o`` replaces the ``@ v`` and its ``probs`` every other use of the softmax. An attention whose
probabilities feed only its ``@ v`` is left to ``lower_attention``.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from ._ir_utils import (
    DOMAIN,
    Builder,
    FusionPass,
    attr,
    dims,
    ensure_function,
    fuse_each,
    rank,
    replace_value,
    same_dim,
)
from ._match import all_true_mask, qk_product, single_use, through_cast, transposed, where_mask

logger = logging.getLogger(__name__)


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


def fuse_prob_attention(model: ir.Model) -> int:
    """Replace each probability-producing softmax attention by a ProbAttention node."""
    return fuse_each(model, "ProbAttention", lambda n: n.op_type == "Softmax" and n.domain == "", _fuse_prob)


class FuseReusePass(FusionPass):
    """Probability-producing attentions -> ProbAttention."""

    op_type = "ProbAttention"

    def fuse(self, model: ir.Model) -> int:
        return fuse_prob_attention(model)
