"""Standard attention of a decode graph (``attn2onnx export --decode``) onto
``com.microsoft.MultiHeadAttention`` with ``past_key`` / ``past_value`` inputs and
``present_key`` / ``present_value`` outputs (target ``ort``).

The decode graph of mha (and of any model whose decode step has this form) computes, per layer::

    K = Concat([Transpose(past_key [B,N,P,d], 0 2 1 3), Reshape(k [B,T,D], [B,T,N,d])], axis=1)
    V = Concat([Transpose(past_value, 0 2 1 3), Reshape(v, ...)], axis=1)          # [B,P+T,N,d]
    present.key = Transpose(K, 0 2 1 3); present.value = Transpose(V, 0 2 1 3)     # [B,N,P+T,d]
    o = softmax(where(allowed [B,1,T,P+T], s * Qh Transpose(K, 0 2 3 1), NEG)) present.value

so each step copies the whole cache three to four times (to token-major, the Concat, back to
head-major, and K once more for the MatMul). :mod:`.lower_attention` leaves that form alone
(its keys are not heads split from a [B,S,D] tensor). MultiHeadAttention takes the new k, v
[B,T,D] and the head-major past directly and writes the present once, so one copy per step
remains; benchmarks/RESULTS.md ("Decode") has the measurement that decided this lowering.

The mask (key padding over past and new positions, and causality aligned to the end of the
keys, whatever form the graph computes it in) goes in whole as an additive ``attention_bias``
[B,1,T,P+T]; query rows with no allowed key keep the contract (uniform over all keys: a padded
position before a left-padded sequence's first real token) through
:func:`.lower_attention.guard_empty_rows`, as every other lowering does. MHA's own causal mode
is not used: its fully masked rows spread over the causal keys only. An fp16 graph's Casts
around the Where / Softmax (the softmax in fp32) are taken in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ._ir_utils import Builder, attr, const_scalar, dims, producer, rank, replace_value, same_dim, scope_nodes
from ._match import merged_heads_target, perm_of, scaled, single_use, split_heads_source, through_cast
from .lower_attention import MS_DOMAIN, NEG, guard_empty_rows

TOKEN_MAJOR = (0, 2, 1, 3)  # [B,N,S,d] <-> [B,S,N,d]
KEYS_TRANSPOSED = (0, 2, 3, 1)  # [B,S,N,d] -> [B,N,d,S]
FILL_LIMIT = -1e9  # a Where fill at or below this is the contract's NEG


@dataclass
class Cache:
    """One side (K or V) of a matched core: the head-major past [B,N,P,d], the new tokens
    [B,T,D], and the value holding the head-major present [B,N,P+T,d] (None: not read)."""

    past: ir.Value
    new: ir.Value
    present: ir.Value | None


@dataclass
class DecodeCore:
    """A matched decode attention core: q [B,T,D], both caches, the boolean mask
    [B,1,T,P+T], heads, scale, the core's merged output [B,T,D] and the node to insert before."""

    q: ir.Value
    key: Cache
    value: Cache
    allowed: ir.Value
    heads: int
    scale: float
    out: ir.Value
    anchor: ir.Node


def _new_tokens(value: ir.Value, heads: int, head_dim: int) -> ir.Value | None:
    """value = Reshape(src [B,T,N*d], [B,T,N,d]) -> src."""
    r = producer(value, "Reshape")
    if r is None:
        return None
    src, d3, d4 = r.inputs[0], dims(r.inputs[0]), dims(value)
    if (
        d3 is None
        or d4 is None
        or len(d3) != 3
        or len(d4) != 4
        or d4[2:] != (heads, head_dim)
        or d3[2] != heads * head_dim
        or not same_dim(d3[0], d4[0])
        or not same_dim(d3[1], d4[1])
    ):
        return None
    return src


def _extended(value: ir.Value, perm: tuple, heads: int, head_dim: int) -> tuple[ir.Value, Cache] | None:
    """value = Transpose(Concat([Transpose(past, 0 2 1 3), Reshape(new)], axis=1), perm) -> (the
    Concat's output, the cache). The Concat may also feed one head-major Transpose (the present);
    any other reader of it and the match fails."""
    t = producer(value, "Transpose")
    if t is None or perm_of(t) != perm:
        return None
    cat = producer(t.inputs[0], "Concat")
    if cat is None or len(cat.inputs) != 2 or attr(cat, "axis") not in (1, -3) or rank(cat.outputs[0]) != 4:
        return None
    back = producer(cat.inputs[0], "Transpose")
    new = _new_tokens(cat.inputs[1], heads, head_dim)
    if back is None or perm_of(back) != TOKEN_MAJOR or new is None:
        return None
    past = back.inputs[0]
    if dims(past) is None or len(dims(past)) != 4 or dims(past)[1] != heads or dims(past)[3] != head_dim:
        return None
    present = value if perm == TOKEN_MAJOR else None
    for use in cat.outputs[0].uses():
        node = use.node
        if node is t:
            continue
        if present is not None or node.op_type != "Transpose" or perm_of(node) != TOKEN_MAJOR:
            return None
        present = node.outputs[0]
    return cat.outputs[0], Cache(past, new, present)


def match_decode_core(soft: ir.Node) -> DecodeCore | None:
    """The decode core ending at Softmax node ``soft`` (see the module docstring), or None."""
    if soft.op_type != "Softmax" or soft.domain != "" or attr(soft, "axis", -1) % 4 != 3 or rank(soft.outputs[0]) != 4:
        return None
    probs, masked = through_cast(soft.outputs[0], upstream=False), soft.inputs[0]
    uses = list(probs.uses())
    if not single_use(probs) or uses[0].node.op_type != "MatMul" or uses[0].idx != 0 or not single_use(masked):
        return None
    pv = uses[0].node
    out = merged_heads_target(pv.outputs[0])
    where = producer(masked, "Where")
    if out is None or where is None:
        return None
    allowed, logits, fill = where.inputs
    neg = const_scalar(fill)
    if neg is None or neg > FILL_LIMIT or not single_use(logits):
        return None
    logits = through_cast(logits, upstream=True)
    if not single_use(logits):
        return None
    inner, scale = scaled(logits)
    qk = producer(inner, "MatMul")
    if qk is None:
        return None
    qh, q_scale = scaled(qk.inputs[0])
    kt, k_scale = scaled(qk.inputs[1])
    q = split_heads_source(qh, TOKEN_MAJOR)
    dq = dims(qh)
    if q is None or dq is None or not isinstance(dq[1], int) or not isinstance(dq[3], int) or not single_use(kt):
        return None
    heads, head_dim = dq[1], dq[3]
    key = _extended(kt, KEYS_TRANSPOSED, heads, head_dim)
    value = _extended(pv.inputs[1], TOKEN_MAJOR, heads, head_dim)
    if key is None or value is None:
        return None
    da, ds = dims(allowed), dims(masked)
    if (
        da is None
        or ds is None
        or len(da) != 4
        or da[1] != 1
        or not same_dim(da[2], dims(q)[1])
        or not same_dim(da[3], ds[3])
    ):
        return None  # the bias must be the full [B|1, 1, T, P+T]: ORT checks its T axis
    return DecodeCore(q, key[1], value[1], allowed, heads, scale * q_scale * k_scale, out, pv)


def emit_decode_attention(b: Builder, core: DecodeCore) -> tuple[ir.Value, ir.Value, ir.Value]:
    """MultiHeadAttention(q, k, v, attention_bias, past_key, past_value) -> (output [B,T,D],
    present_key, present_value), with the mask as an additive bias and empty rows guarded."""
    q, allowed = guard_empty_rows(b, core.q, core.allowed)
    dtype = q.dtype
    f = dtype.numpy()
    neg = b.const(np.full((), max(NEG, float(np.finfo(f).min)), dtype=f), "neg")
    bias = b.op("Where", [allowed, b.const(np.zeros((), dtype=f), "zero"), neg], dtype=dtype, shape=None)
    inputs = [q, core.key.new, core.value.new, None, None, bias, core.key.past, core.value.past]
    out, present_key, present_value = b.op(
        "MultiHeadAttention",
        inputs,
        {"num_heads": core.heads, "scale": float(core.scale)},
        domain=MS_DOMAIN,
        num_outputs=3,
        dtype=dtype,
    )
    out.shape = ir.Shape(list(dims(core.out))) if dims(core.out) is not None else None
    return out, present_key, present_value


def fuse_decode_attention(model: ir.Model) -> int:
    """Lower every matched decode core of every scope; returns how many."""
    count = 0
    for node in scope_nodes(model):
        if node.graph is None:
            continue
        core = match_decode_core(node)
        if core is None:
            continue
        out, present_key, present_value = emit_decode_attention(Builder(core.anchor, "decode_attn"), core)
        replace_value(core.out, out)
        for old, new in ((core.key.present, present_key), (core.value.present, present_value)):
            if old is not None:
                replace_value(old, new)
        count += 1
    if count:
        model.opset_imports.setdefault(MS_DOMAIN, 1)
        ir.passes.common.RemoveUnusedNodesPass()(model)
    return count


class FuseDecodeAttentionPass(ir.passes.InPlacePass):
    """Decode-graph attention onto MultiHeadAttention with past / present (target ``ort``)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        fused = fuse_decode_attention(model)
        self.counts = {"MultiHeadAttention (past/present)": fused}
        return ir.passes.PassResult(model, bool(fused))
