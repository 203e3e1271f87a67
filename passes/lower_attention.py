"""Lower attention onto fused standard attention kernels, and pack projections.

* Decomposed softmax attention -- ``softmax(where(allowed, s * Qh Kh^T, NEG)) Vh`` on heads split
  from ``[B,T,D]`` tensors (mha, optimised, efficient, super as exported) -- becomes one fused node
  on the ``[B,T,D]`` tensors themselves:

  - target ``ort``: ``com.microsoft.MultiHeadAttention`` (measured faster than ONNX Attention-23
    and than the decomposed graph on ORT's CPU provider, see benchmarks/RESULTS.md), with a
    recognised key padding mask alone as ``key_padding_mask``, causality alone as
    ``unidirectional``, else the mask as an additive ``attention_bias``;
  - targets ``trt`` / ``portable``: ONNX ``Attention`` (opset 23) with the boolean mask.

  The contract's fully masked rows (variants.md: uniform over all keys) are kept exactly in any
  precision: query rows with no allowed key are zeroed and allowed every key
  (:func:`guard_empty_rows`), since no fused op computes them as ``where(allowed, x, NEG)`` does.

  Keys / values that are raw slices of ``x`` (optimised, efficient) or ``SuperMix(x)`` (super: WA x
  computed once per layer) feed the fused op directly, with no projection.
* ``PooledNormAttention`` (Attention-BN / SH / BN-SH): heads are grouped by pooling factor; per
  group the keys and values are average-pooled by the factor (masked mean, last window partial),
  BN's key statistics normalise q and k in a few elementwise ops, and one fused attention runs;
  the groups' outputs go back in head order.
* Projections sharing an input (``MatMul(x, W_i) [+ b_i]`` with constant weights): packed into
  one wide MatMul and a Split -- Q|K|V for mha, Q|K for optimised, and for DCMHA the
  ``[Wq|Wk|Wv|dw1|dd]`` GEMM. Packing never changes MACs.
* Folding two consecutive linear maps (``W_V W_O`` or ``W_Q W_K^T``) is exact per head but only
  saves work for one head (variants.md: N per-head D x D maps cost N T D^2 against 2 T D^2), so
  the pass folds nothing (every exported variant here has N >= 2).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ._ir_utils import (
    DOMAIN,
    Builder,
    expand_to_logits,
    attr,
    const_array,
    dims,
    producer,
    rank,
    replace_value,
    scope_nodes,
)
from . import native_attention
from ._match import merged_heads_target as _merged_heads_target
from ._match import scaled as _scaled
from ._match import single_use as _single_use
from ._match import split_heads_source as _split_heads_source
from ._match import through_cast as _through_cast
from ._match import where_mask as _mask

MS_DOMAIN = "com.microsoft"
NEG = -1e30


# ---------------------------------------------------------------------------------------------
# matching the decomposed core
# ---------------------------------------------------------------------------------------------
def _match_core(soft: ir.Node):
    """Everything the lowering needs from one decomposed core, or None. An fp16 graph's masked
    softmax in fp32 (logits cast up before the mask, probabilities cast back after the Softmax) is
    the same core: the fused op takes and returns the graph's precision."""
    if attr(soft, "axis", -1) % 4 != 3 or rank(soft.outputs[0]) != 4:
        return None
    probs = _through_cast(soft.outputs[0], upstream=False)
    uses = list(probs.uses())
    if not _single_use(probs) or uses[0].node.op_type != "MatMul" or uses[0].idx != 0:
        return None
    pv = uses[0].node
    target = _merged_heads_target(pv.outputs[0])
    if target is None:
        return None
    masked = _through_cast(soft.inputs[0], upstream=True)
    if not _single_use(masked):
        return None
    where = producer(masked, "Where")
    found = _mask(masked, dims(masked))
    allowed = None
    if where is not None:
        if found is None:  # an unrecognised mask: keep it whole as a boolean tensor [B|1, 1, T, S]
            cond, x, y = where.inputs
            c, d = const_array(y), dims(cond)
            if c is None or c.size != 1 or float(c.reshape(-1)[0]) > -1e9 or d is None or len(d) != 4 or d[1] != 1:
                return None  # also a per-head mask: its empty rows cannot be guarded on [B,T,D] queries
            allowed, logits, parts = cond, x, None
        else:
            logits, parts = found
    else:
        logits, parts = masked, {}
    logits = _through_cast(logits, upstream=True)
    if not _single_use(logits) or logits.dtype != probs.dtype:  # one precision in and out of the fused op
        return None
    inner, scale = _scaled(logits)
    qk = producer(inner, "MatMul")
    if qk is None:
        return None
    qh, ks = _scaled(qk.inputs[0])
    kt, kscale = _scaled(qk.inputs[1])
    q3 = _split_heads_source(qh, (0, 2, 1, 3))
    k3 = _split_heads_source(kt, (0, 2, 3, 1))
    v3 = _split_heads_source(pv.inputs[1], (0, 2, 1, 3))
    if q3 is None or k3 is None or v3 is None:
        return None
    n = dims(qh)[1]
    return dict(
        q=q3,
        k=k3,
        v=v3,
        heads=n,
        head_dim=dims(qh)[3],
        scale=scale * ks * kscale,
        parts=parts,
        allowed=allowed,
        where=where,
        target=target,
        anchor=pv,
    )


# ---------------------------------------------------------------------------------------------
# emitting the fused op
# ---------------------------------------------------------------------------------------------
def emit_fused_attention(
    b: Builder,
    target: str,
    q,
    k,
    v,
    heads: int,
    scale: float,
    parts: dict | None,
    allowed,
    out_dims,
    native: bool = False,
    kv_heads: int = 0,
) -> ir.Value:
    """Fused attention on [B,T,D] q and [B,S,D] k, v -> [B,T,D], exactly the contract's
    ``softmax(where(allowed, logits, NEG))``: the mask is ``parts`` (key padding / causal) or an
    unrecognised boolean ``allowed`` [B|1,1,T,S]. Rows with no allowed key are guarded (see
    :func:`guard_empty_rows`) wherever the mask holds padding; causality alone (T = S) always
    leaves a row its own key.

    With ``native`` (target ort), a core whose class measured faster on the native kernel
    (:mod:`.native_attention`) becomes ``ai.attn2onnx::StandardAttention``, masks as modes and
    the [B,S] key mask, rows kept by the op itself. ``kv_heads``: k and v hold that many heads
    (grouped query attention; only the native op takes them unrepeated: 0 = ``heads``)."""
    if native_attention.choose(target, parts, allowed, _head_dim(q, heads), out_dims[1] if out_dims else None, native):
        return native_attention.emit(b, q, k, v, heads, kv_heads or heads, scale, parts, out_dims)
    kpm = parts.get("kpm") if parts is not None else None
    causal = int(parts.get("causal", 0)) if parts is not None else 0
    if target == "ort" and parts is not None and (kpm is None or not causal):
        return _multi_head_attention(b, q, k, v, heads, scale, kpm, causal, out_dims)
    if parts is not None:
        allowed = _allowed_from_parts(b, parts, q, k)
    if allowed is not None and (parts is None or kpm is not None):
        q, allowed = guard_empty_rows(b, q, allowed)
    if allowed is not None:  # the full [B|1, 1, T, S] (ORT checks the T axis)
        allowed = expand_to_logits(b, allowed, q, k)
    dtype = q.dtype
    if target == "ort":  # padding with causality: an additive bias, as MHA's causal mode has its own empty rows
        bias = None
        if allowed is not None:
            f = dtype.numpy()
            neg = b.const(np.full((), max(NEG, float(np.finfo(f).min)), dtype=f), "neg")
            bias = b.op("Where", [allowed, b.const(np.zeros((), dtype=f), "zero"), neg], dtype=dtype, shape=None)
        return b.op(
            "MultiHeadAttention",
            [q, k, v, None, None, bias],
            {"num_heads": heads, "scale": float(scale)},
            domain=MS_DOMAIN,
            dtype=dtype,
            shape=out_dims,
        )
    inputs = [q, k, v] + ([allowed] if allowed is not None else [])
    return b.op(
        "Attention",
        inputs,
        {"q_num_heads": heads, "kv_num_heads": heads, "scale": float(scale)},
        dtype=dtype,
        shape=out_dims,
    )


def _head_dim(q: ir.Value, heads: int) -> int:
    """q [B,T,N*d]'s d, 0 when its last dim is not static."""
    d = dims(q)
    return d[-1] // heads if d is not None and isinstance(d[-1], int) else 0


def _multi_head_attention(b: Builder, q, k, v, heads: int, scale: float, kpm, causal: int, out_dims) -> ir.Value:
    """com.microsoft.MultiHeadAttention with the key padding mask as ``key_padding_mask`` (rows
    with no real key guarded) or causality as ``unidirectional``, never both: MHA's causal mode
    makes a fully masked row uniform over the causal keys only, not over all keys."""
    inputs: list = [q, k, v]
    if kpm is not None:
        allowed = b.op("Unsqueeze", [kpm, b.ints([1, 2])], dtype=ir.DataType.BOOL, shape=None)
        q, allowed = guard_empty_rows(b, q, allowed)
        kpm = b.op("Squeeze", [allowed, b.ints([1, 2])], dtype=ir.DataType.BOOL, shape=dims(kpm))
        mask = b.op("Cast", [kpm], {"to": ir.DataType.INT32}, dtype=ir.DataType.INT32, shape=dims(kpm))
        inputs = [q, k, v, None, mask]
    attrs = {"num_heads": heads, "scale": float(scale), "mask_filter_value": NEG, "unidirectional": causal}
    return b.op("MultiHeadAttention", inputs, attrs, domain=MS_DOMAIN, dtype=q.dtype, shape=out_dims)


def guard_empty_rows(b: Builder, q: ir.Value, allowed: ir.Value) -> tuple[ir.Value, ir.Value]:
    """For q [B,T,D] and a boolean ``allowed`` [B|1, 1, T|1, S]: the query rows that have no
    allowed key are zeroed and allowed every key. Their logits are then all 0, so the softmax is
    uniform over all keys -- what ``where(allowed, logits, NEG)`` gives such a row -- in any
    precision and whatever the fused op does with a fully masked row (ORT's Attention-23 gives
    zeros, MHA's causal mode a uniform row over the causal keys, and an additive NEG is not
    representable in fp16). Rows with an allowed key are untouched: there a masked logit's
    weight underflows to exactly 0 with NEG, -inf or finfo.min alike."""
    dtype = q.dtype
    real = b.op("Cast", [allowed], {"to": dtype}, dtype=dtype, shape=None)
    has_key = b.op("ReduceMax", [real, b.ints([3])], {"keepdims": 1}, dtype=dtype, shape=None)  # [B|1,1,T|1,1]
    q = b.op("Mul", [q, b.op("Squeeze", [has_key, b.ints([1])], dtype=dtype, shape=None)], dtype=dtype, shape=dims(q))
    empty = b.op(
        "Not",
        [b.op("Cast", [has_key], {"to": ir.DataType.BOOL}, dtype=ir.DataType.BOOL, shape=None)],
        dtype=ir.DataType.BOOL,
        shape=None,
    )
    return q, b.op("Or", [allowed, empty], dtype=ir.DataType.BOOL, shape=None)


def _allowed_from_parts(b: Builder, parts: dict, q, k) -> ir.Value | None:
    kpm, causal = parts.get("kpm"), parts.get("causal", 0)
    mask = None
    if kpm is not None:
        mask = b.op("Unsqueeze", [kpm, b.ints([1, 2])], dtype=ir.DataType.BOOL, shape=None)
    if causal:
        t = b.op("Shape", [q], {"start": 1, "end": 2}, dtype=ir.DataType.INT64, shape=(1,))
        s = b.op("Shape", [k], {"start": 1, "end": 2}, dtype=ir.DataType.INT64, shape=(1,))
        ones = b.op(
            "Expand",
            [b.const(np.array(True), "true"), b.op("Concat", [t, s], {"axis": 0}, dtype=ir.DataType.INT64, shape=(2,))],
            dtype=ir.DataType.BOOL,
            shape=None,
        )
        offset = b.op(
            "Squeeze", [b.op("Sub", [s, t], dtype=ir.DataType.INT64, shape=(1,))], dtype=ir.DataType.INT64, shape=()
        )
        tril = b.op("Trilu", [ones, offset], {"upper": 0}, dtype=ir.DataType.BOOL, shape=None)
        tril = b.op("Unsqueeze", [tril, b.ints([0, 1])], dtype=ir.DataType.BOOL, shape=None)  # [1,1,T,S]
        mask = tril if mask is None else b.op("And", [mask, tril], dtype=ir.DataType.BOOL, shape=None)
    return mask


def lower_decomposed(model: ir.Model, target: str, native: bool = False) -> int:
    """Every decomposed core of ``model`` fused (``native``: onto StandardAttention where it is
    the faster op, see :func:`emit_fused_attention`); returns how many."""
    count = 0
    for node in scope_nodes(model):
        if node.op_type != "Softmax" or node.domain != "" or node.graph is None:
            continue
        core = _match_core(node)
        if core is None:
            continue
        b = Builder(core["anchor"], "attn")
        allowed = core["allowed"]
        out = emit_fused_attention(
            b,
            target,
            core["q"],
            core["k"],
            core["v"],
            core["heads"],
            core["scale"],
            core["parts"],
            allowed,
            dims(core["target"]),
            native=native,
        )
        replace_value(core["target"], out)
        count += 1
    if count:
        if target == "ort":
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        native_attention.attach_function(model)
        ir.passes.common.RemoveUnusedNodesPass()(model)
    return count


# ---------------------------------------------------------------------------------------------
# Attention-BN (PooledNormAttention with every factor 1)
# ---------------------------------------------------------------------------------------------
def _flatten_heads(b: Builder, x4: ir.Value, width: int) -> ir.Value:
    """[B,X,n,d] -> [B,X,width = n*d], or the [B,X,width] tensor x4 was split from."""
    r = producer(x4, "Reshape")
    if r is not None and rank(r.inputs[0]) == 3 and dims(r.inputs[0])[2] == width:
        return r.inputs[0]
    d = dims(x4)
    return b.op(
        "Reshape", [x4, b.ints([0, 0, width])], dtype=x4.dtype, shape=None if d is None else (d[0], d[1], width)
    )


def _normalise(b: Builder, node: ir.Node, q4: ir.Value, k4: ir.Value, weight: ir.Value) -> tuple[ir.Value, ir.Value]:
    """Attention-BN: key statistics over the real key tokens (``weight`` [B,S,1,1], 1 = real)
    shift (and rescale) both q and k."""
    dtype, f = q4.dtype, q4.dtype.numpy()
    eps, beta = float(attr(node, "eps", 1e-5)), float(attr(node, "beta", 1.0))

    def op(op_type: str, *inputs: ir.Value, **attrs) -> ir.Value:
        return b.op(op_type, list(inputs), attrs or None, dtype=dtype, shape=None)

    axis = b.ints([1])
    count = op("Max", op("ReduceSum", weight, axis, keepdims=1), b.const(np.ones((), f), "one"))
    mu = op("Div", op("ReduceSum", op("Mul", k4, weight), axis, keepdims=1), count)
    centred = op("Sub", k4, mu)
    var = op("Div", op("ReduceSum", op("Mul", op("Mul", centred, centred), weight), axis, keepdims=1), count)
    shift = op("Mul", mu, b.const(np.full((), beta, f), "beta"))
    q4, k4 = op("Sub", q4, shift), op("Sub", k4, shift)
    if attr(node, "rescale", 1):
        inv = op("Reciprocal", op("Sqrt", op("Add", var, b.const(np.full((), eps, f), "eps"))))
        q4, k4 = op("Mul", q4, inv), op("Mul", k4, inv)
    return q4, k4


def _pool(b: Builder, x4: ir.Value, weight: ir.Value, factor: int, tail: tuple[int, int]) -> ir.Value:
    """Masked mean of x4 [B,S,n,d] (``tail`` = (n, d)) over windows of ``factor`` tokens, the
    last one partial: ``weight`` [B,S,1,1] (1 = real). Returns [B,ceil(S/r),n,d]; empty windows
    give 0."""
    dtype, f = x4.dtype, x4.dtype.numpy()
    d = (None, None) + tuple(tail)
    s = b.op("Shape", [x4], {"start": 1, "end": 2}, dtype=ir.DataType.INT64, shape=(1,))
    r = b.ints([factor], "factor")
    pad = b.op(
        "Mod",
        [
            b.op(
                "Sub",
                [r, b.op("Mod", [s, r], dtype=ir.DataType.INT64, shape=(1,))],
                dtype=ir.DataType.INT64,
                shape=(1,),
            ),
            r,
        ],
        dtype=ir.DataType.INT64,
        shape=(1,),
    )
    zeros = b.ints([0], "zero")
    pads = b.op(
        "Concat",
        [zeros, zeros, zeros, zeros, zeros, pad, zeros, zeros],
        {"axis": 0},
        dtype=ir.DataType.INT64,
        shape=(8,),
    )
    windows = b.ints([0, -1, factor, d[2], d[3]], "windows")
    wwin = b.ints([0, -1, factor, 1, 1], "weight_windows")
    xs = b.op(
        "Reshape",
        [b.op("Pad", [b.op("Mul", [x4, weight], dtype=dtype, shape=None), pads], dtype=dtype, shape=None), windows],
        dtype=dtype,
        shape=None,
    )
    ws = b.op("Reshape", [b.op("Pad", [weight, pads], dtype=dtype, shape=None), wwin], dtype=dtype, shape=None)
    axis = b.ints([2])
    total = b.op("ReduceSum", [xs, axis], {"keepdims": 0}, dtype=dtype, shape=None)
    count = b.op("ReduceSum", [ws, axis], {"keepdims": 0}, dtype=dtype, shape=None)
    count = b.op("Max", [count, b.const(np.ones((), f), "one")], dtype=dtype, shape=None)
    return b.op("Div", [total, count], dtype=dtype, shape=None)


def lower_pooled_norm(model: ir.Model, target: str) -> int:
    """PooledNormAttention -> (per group of heads with one pooling factor) pooled, normalised
    keys / values and one fused attention, heads put back in their order."""
    count = 0
    for node in scope_nodes(model):
        if node.op_type != "PooledNormAttention" or node.domain != DOMAIN:
            continue
        q4, k4, v4, kpm = node.inputs
        dq, dk = dims(q4), dims(k4)
        if dq is None or dk is None or len(dq) != 4 or not isinstance(dq[2], int) or not isinstance(dq[3], int):
            continue
        n, d = dq[2], dq[3]
        factors = [int(f) for f in (attr(node, "factors", None) or [1] * n)]
        if len(factors) != n or min(factors) < 1:
            continue
        dtype = q4.dtype
        scale = float(attr(node, "scale", 0.0)) or 1.0 / float(np.sqrt(d))
        b = Builder(node, "pooled")
        groups: dict[int, list[int]] = {}
        for head, factor in enumerate(factors):
            groups.setdefault(factor, []).append(head)
        order: list[int] = []
        outs = []
        for factor, heads in groups.items():

            def take(x: ir.Value) -> ir.Value:
                if len(heads) == n:
                    return x
                dx = dims(x)
                return b.op(
                    "Gather",
                    [x, b.ints(heads, "heads")],
                    {"axis": 2},
                    dtype=dtype,
                    shape=(dx[0], dx[1], len(heads), dx[3]),
                )

            qg, kg, vg = take(q4), take(k4), take(v4)
            weight = b.op(
                "Cast",
                [b.op("Unsqueeze", [kpm, b.ints([2, 3])], dtype=ir.DataType.BOOL, shape=None)],
                {"to": dtype},
                dtype=dtype,
                shape=None,
            )  # [B,S,1,1]
            mask = kpm
            if factor > 1:
                tail = (len(heads), d)
                kg, vg = _pool(b, kg, weight, factor, tail), _pool(b, vg, weight, factor, tail)
                weight = _pool(b, weight, weight, factor, (1, 1))  # fraction of real tokens, > 0 iff the window is real
                weight = b.op(
                    "Cast",
                    [
                        b.op(
                            "Greater",
                            [weight, b.const(np.zeros((), dtype.numpy()), "zero")],
                            dtype=ir.DataType.BOOL,
                            shape=None,
                        )
                    ],
                    {"to": dtype},
                    dtype=dtype,
                    shape=None,
                )
                mask = b.op(
                    "Cast",
                    [b.op("Squeeze", [weight, b.ints([2, 3])], dtype=dtype, shape=None)],
                    {"to": ir.DataType.BOOL},
                    dtype=ir.DataType.BOOL,
                    shape=None,
                )
            else:  # the reference pools by 1 too: a padded token's value is 0, what a fully padded row averages
                vg = b.op("Mul", [vg, weight], dtype=dtype, shape=dims(vg))
            if attr(node, "normalize", 0):
                qg, kg = _normalise(b, node, qg, kg, weight)
            q3, k3, v3 = (_flatten_heads(b, t, len(heads) * d) for t in (qg, kg, vg))
            out3 = emit_fused_attention(
                b,
                target,
                q3,
                k3,
                v3,
                len(heads),
                scale,
                {"kpm": mask, "causal": 0},
                None,
                (dq[0], dq[1], len(heads) * d),
            )
            outs.append(
                b.op("Reshape", [out3, b.ints([0, 0, len(heads), d])], dtype=dtype, shape=(dq[0], dq[1], len(heads), d))
            )
            order += heads
        out = outs[0] if len(outs) == 1 else b.op("Concat", outs, {"axis": 2}, dtype=dtype, shape=dq)
        if order != list(range(n)):
            inverse = [order.index(h) for h in range(n)]
            out = b.op("Gather", [out, b.ints(inverse, "head_order")], {"axis": 2}, dtype=dtype, shape=dq)
        replace_value(node.outputs[0], out)
        count += 1
    if count:
        if target == "ort":
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        native_attention.attach_function(model)
        ir.passes.common.RemoveUnusedNodesPass()(model)
    return count


# ---------------------------------------------------------------------------------------------
# projection packing
# ---------------------------------------------------------------------------------------------
def _projection(node: ir.Node):
    """MatMul(x, W const 2-D) [+ b const 1-D] -> (W, b or None, output value)."""
    w = const_array(node.inputs[1])
    if w is None or w.ndim != 2 or node.inputs[1].const_value is None:
        return None
    out = node.outputs[0]
    bias = None
    uses = list(out.uses())
    if _single_use(out) and uses[0].node.op_type == "Add" and uses[0].node.domain == "":
        add = uses[0].node
        other = add.inputs[1 - uses[0].idx]
        bv = const_array(other)
        if bv is not None and bv.ndim == 1 and bv.shape[0] == w.shape[1]:
            bias, out = bv, add.outputs[0]
    return w, bias, out


_FUSED_ATTENTION = {
    ("", "Attention"),
    (MS_DOMAIN, "MultiHeadAttention"),
    (DOMAIN, "DcmhaAttention"),
    (DOMAIN, native_attention.OP),
}


def _feeds_fused_attention(value: ir.Value, depth: int = 12) -> bool:
    """Whether ``value`` reaches a fused attention node within ``depth`` nodes."""
    frontier, seen = [value], set()
    for _ in range(depth):
        nxt = []
        for v in frontier:
            for use in v.uses():
                node = use.node
                if (node.domain, node.op_type) in _FUSED_ATTENTION:
                    return True
                if id(node) not in seen:
                    seen.add(id(node))
                    nxt.extend(node.outputs)
        frontier = nxt
    return False


def pack_projections(model: ir.Model, min_group: int = 2) -> int:
    """Pack MatMuls that share their input and have constant weights into one MatMul + Split,
    where the group feeds a fused attention node (Q|K|V, or DCMHA's [Wq|Wk|Wv|dw1|dd]): the
    wide GEMM is faster there, while elsewhere (measured: iMHSA's landmark op at T=256) the Split's
    copies can cost more than the GEMM saves."""
    groups: dict[tuple[int, int], list[tuple[ir.Node, tuple]]] = {}  # one group per graph and input
    for node in scope_nodes(model):
        if node.op_type == "MatMul" and node.domain == "" and rank(node.inputs[0]) and rank(node.inputs[0]) >= 2:
            proj = _projection(node)
            if proj is not None:
                groups.setdefault((id(node.graph), id(node.inputs[0])), []).append((node, proj))
    count = 0
    for members in groups.values():
        members = [(n, p) for n, p in members if p[0].dtype == members[0][1][0].dtype]
        if len(members) < min_group or not any(_feeds_fused_attention(p[2]) for _, p in members):
            continue
        x = members[0][0].inputs[0]
        # insert after the last of x's users' inputs are ready: before the first member
        order = {id(n): i for i, n in enumerate(members[0][0].graph)}
        first = min((n for n, _ in members), key=lambda n: order[id(n)])
        b = Builder(first, "packed")
        weights = np.concatenate([p[0] for _, p in members], axis=1)
        widths = [p[0].shape[1] for _, p in members]
        dx = dims(x)
        out_shape = None if dx is None else dx[:-1] + (int(weights.shape[1]),)
        y = b.op("MatMul", [x, b.const(weights, "weight")], dtype=x.dtype, shape=out_shape)
        if any(p[1] is not None for _, p in members):
            bias = np.concatenate(
                [p[1] if p[1] is not None else np.zeros(w, weights.dtype) for (_, p), w in zip(members, widths)]
            )
            y = b.op("Add", [y, b.const(bias.astype(weights.dtype), "bias")], dtype=x.dtype, shape=out_shape)
        outs = b.op("Split", [y, b.ints(widths, "split")], {"axis": -1}, num_outputs=len(members), dtype=x.dtype)
        for out, ((_, p), w) in zip(outs, zip(members, widths)):
            out.shape = ir.Shape(list(dx[:-1]) + [w]) if dx is not None else None
            replace_value(p[2], out)
        count += 1
    if count:
        ir.passes.common.RemoveUnusedNodesPass()(model)
    return count


class LowerAttentionPass(ir.passes.InPlacePass):
    """Attention lowering for ``target`` (ort | trt | portable) plus projection packing."""

    def __init__(self, target: str = "ort", pack: bool = True, native: bool = True) -> None:
        super().__init__()
        self.target, self.pack = target, pack
        self.native = native  # StandardAttention where faster (target ort)
        self.counts: dict[str, int] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        fused = "MultiHeadAttention" if self.target == "ort" else "Attention"
        before = native_attention.count(model)
        cores = lower_decomposed(model, self.target, self.native)
        on_native = native_attention.count(model) - before
        bn = lower_pooled_norm(model, self.target)
        packed = pack_projections(model) if self.pack else 0
        self.counts = {fused: cores - on_native + bn, "packed MatMul": packed}
        if on_native:
            self.counts[native_attention.OP] = on_native
        return ir.passes.PassResult(model, bool(cores or bn or packed))
