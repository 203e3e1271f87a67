"""Fuse the iMHSA core (variants.md §6) written in plain PyTorch into ``ai.attn2onnx::LandmarkAttention``.

The core: pooling ``Unsqueeze(W, 1) @ q`` and ``@ k`` by one [B,L,T] averaging matrix W, the
key-less map ``s q k~^T`` and the query-less map ``s q~ k^T``, an optional pre head mix on each
(``Einsum('gh,bhxy->bgxy', M, S) + c`` or the head axis moved last, ``@ M^T + c`` and moved back;
constant M, c), the masked softmaxes (landmark mask / key padding mask, each optionally re-zeroed
by ``where(allowed, A, 0)`` as the op does; without it the plain graph differs from the op only on
a row with no real token at all, uniform weights there where the op gives 0) and ``A_Q (A_K v)``.

The pooling must be the op's (:func:`attn2onnx.custom_ops._attention_math.segment_weights`), and
that is decided from the graph alone (:func:`match_segment_pooling`): W and the landmark mask must
be built from the key padding mask exactly as the op builds them, each step one of the equivalent
ways of writing it listed there. A pooling written any other way is not fused; the NoMatch says
which step differed (``optimize --explain`` shows it).
Not matched: post (after-softmax) mixing, grid pooling, reshape-mean pooling, einsum pooling.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ._ir_utils import (
    DOMAIN,
    Builder,
    FusionPass,
    attr,
    axes_of,
    const_array,
    const_scalar,
    dims,
    ensure_function,
    fuse_each,
    norm_axes,
    producer,
    rank,
    replace_value,
    same_dim,
)
from ._match import NoMatch, found_op, parse_equation, scaled, single_use, transposed, where_mask

logger = logging.getLogger(__name__)

# Casts that keep every value of this pooling exact: booleans, counts and ranks (integers below
# 2**24) and segment ids survive int32 / int64 / float / double unchanged.
_EXACT_CASTS = (ir.DataType.INT32, ir.DataType.INT64, ir.DataType.FLOAT, ir.DataType.DOUBLE)


def _folded(value: ir.Value | None) -> np.ndarray | None:
    """A constant, also through any number of Unsqueeze / Reshape / Transpose nodes of constants
    (walked in a loop down to the constant, then applied back up)."""
    chain: list[ir.Node] = []
    while (arr := const_array(value)) is None and value is not None:
        node = producer(value, ("Unsqueeze", "Reshape", "Transpose"))
        if node is None:
            return None
        chain.append(node)
        value = node.inputs[0]
    for node in reversed(chain):
        if arr is None:
            return None
        arr = _folded_step(node, arr)
    return arr


def _folded_step(node: ir.Node, src: np.ndarray) -> np.ndarray | None:
    """What ``node`` (Unsqueeze / Reshape / Transpose) makes of the constant ``src``."""
    if node.op_type == "Transpose":
        perm = attr(node, "perm")
        return np.transpose(src, perm) if perm is not None else src.T
    d = dims(node.outputs[0])
    if d is None or not all(isinstance(x, int) for x in d):
        return None
    return src.reshape(d)


def _head_bias(value: ir.Value, n: int, axis: int) -> np.ndarray | None:
    """A constant broadcast along ``axis`` of a rank-4 tensor only -> c [n]."""
    arr = _folded(value)
    if arr is None or arr.ndim > 4:
        return None
    shape = (1,) * (4 - arr.ndim) + arr.shape
    if any(s != 1 for i, s in enumerate(shape) if i != axis) or shape[axis] not in (1, n):
        return None
    return np.broadcast_to(arr.reshape(-1), (n,)).astype(np.float32)


def _head_mix(value: ir.Value) -> tuple[ir.Value, np.ndarray, np.ndarray] | None:
    """value [B,N,X,Y] = sum_h M[g,h] s[:,h] + c[g] -> (s, M, c). Two ways of writing it:
    ``Einsum(M, s)`` over the head axis (+ c broadcast on heads), or the head axis moved last,
    ``@ M^T (+ c)``, and moved back."""
    d = dims(value)
    if d is None or len(d) != 4 or not isinstance(d[1], int):
        return None
    n = d[1]
    bias = np.zeros(n, dtype=np.float32)
    back = producer(value, "Transpose")
    if back is not None and list(attr(back, "perm", [])) == [0, 3, 1, 2]:  # matmul form, [B,X,Y,N] inside
        inner = back.inputs[0]
        add = producer(inner, "Add")
        if add is not None:
            for x, c in (add.inputs, add.inputs[::-1]):
                if producer(x, "MatMul") is not None and (cb := _head_bias(c, n, 3)) is not None:
                    inner, bias = x, cb
                    break
            else:
                return None
        mm = producer(inner, "MatMul")
        there = producer(mm.inputs[0], "Transpose") if mm is not None else None
        mt = _folded(mm.inputs[1]) if mm is not None else None
        if there is None or list(attr(there, "perm", [])) != [0, 2, 3, 1] or mt is None or mt.shape != (n, n):
            return None
        return there.inputs[0], mt.T.astype(np.float32), bias
    inner = value
    add = producer(value, "Add")
    if add is not None:
        for x, c in (add.inputs, add.inputs[::-1]):
            if producer(x, "Einsum") is not None and (cb := _head_bias(c, n, 1)) is not None:
                inner, bias = x, cb
                break
        else:
            return None
    ein = producer(inner, "Einsum")
    if ein is None or len(ein.inputs) != 2:
        return None
    parsed = parse_equation(ein)
    if parsed is None:
        return None
    terms, out = parsed
    for mi in (0, 1):
        m = _folded(ein.inputs[mi])
        lm, ls = terms[mi], terms[1 - mi]
        if m is None or m.shape != (n, n) or len(lm) != 2 or len(ls) != 4 or len(out) != 4:
            continue
        g, h = lm
        if ls[1] != h or out[1] != g or g in ls or h in out or ls[0] + ls[2:] != out[0] + out[2:]:
            continue
        return ein.inputs[1 - mi], m.astype(np.float32), bias
    return None


def _pooled(value: ir.Value) -> tuple[ir.Value, ir.Value] | None:
    """value [B,N,L,d] = Unsqueeze(W [B,L,T], 1) @ x [B,N,T,d] -> (W, x)."""
    mm = producer(value, "MatMul")
    unsq = producer(mm.inputs[0], "Unsqueeze") if mm is not None else None
    if unsq is None or axes_of(unsq) is None or norm_axes(axes_of(unsq), 4) != [1] or rank(unsq.inputs[0]) != 3:
        return None
    return unsq.inputs[0], mm.inputs[1]


def _thin_map(value: ir.Value) -> tuple[ir.Value, ir.Value, float] | None:
    """value = scale * a @ Transpose(b, (0,1,3,2)) -> (a, b, scale)."""
    inner, scale = scaled(value)
    mm = producer(inner, "MatMul")
    if mm is None:
        return None
    a, sa = scaled(mm.inputs[0])
    tr = producer(mm.inputs[1], "Transpose")
    if tr is None or list(attr(tr, "perm", [])) != [0, 1, 3, 2]:
        return None
    return a, tr.inputs[0], scale * sa


def _attention_side(value: ir.Value) -> tuple[ir.Value, np.ndarray, np.ndarray, ir.Value] | None:
    """A = [where(allowed, ] softmax(where(allowed, mix(S), NEG)) [, 0)] ->
    (S, M, c, allowed's [B,X] source) or None."""
    a_dims = dims(value)
    if a_dims is None or len(a_dims) != 4:
        return None
    zero = producer(value, "Where")
    if zero is not None and const_scalar(zero.inputs[2]) == 0.0:
        value = zero.inputs[1]
    soft = producer(value, "Softmax")
    if soft is None or attr(soft, "axis", -1) % 4 != 3:
        return None
    found = where_mask(soft.inputs[0], a_dims)
    if found is None or found[1].get("causal") or found[1].get("kpm") is None:
        return None
    pre, parts = found
    if zero is not None and zero.inputs[0] is not producer(soft.inputs[0], "Where").inputs[0]:
        return None  # re-zeroed with another mask than the softmax's
    mixed = _head_mix(pre)
    if mixed is None:
        n = a_dims[1]
        mixed = (pre, np.eye(n, dtype=np.float32), np.zeros(n, dtype=np.float32))
    return (*mixed, parts["kpm"])


# ---------------------------------------------------------------------------------------------
# the pooling, decided structurally
# ---------------------------------------------------------------------------------------------
def _uncast(value: ir.Value) -> ir.Value:
    """``value`` without the Casts (to a type in _EXACT_CASTS) that produce it."""
    while (node := producer(value, "Cast")) is not None and attr(node, "to") in _EXACT_CASTS:
        value = node.inputs[0]
    return value


def _clamped_to_one(value: ir.Value) -> ir.Value:
    """value = max(x, 1) written as Clip(x, 1) or Max(x, 1) (through exact casts) -> x."""
    v = _uncast(value)
    node = producer(v, ("Clip", "Max"))
    if (
        node is not None
        and node.op_type == "Clip"
        and const_scalar(node.inputs[1]) == 1
        and (len(node.inputs) < 3 or node.inputs[2] is None)
    ):
        return node.inputs[0]
    if node is not None and node.op_type == "Max" and len(node.inputs) == 2:
        for x, one in (node.inputs, node.inputs[::-1]):
            if const_scalar(one) == 1:
                return x
    raise NoMatch(v, "max(count, 1) as Clip(count, 1) or Max(count, 1)", found_op(v))


def _check_row_sum(value: ir.Value, src: ir.Value, axis: int, keepdims: int) -> None:
    """value = ReduceSum(src (through exact casts), axes=[axis], keepdims) or NoMatch."""
    v = _uncast(value)
    node = producer(v, "ReduceSum")
    axes = axes_of(node) if node is not None else None
    if (
        node is None
        or axes is None
        or _uncast(node.inputs[0]) is not src
        or rank(src) is None
        or norm_axes(axes, rank(src)) != [axis]
        or attr(node, "keepdims", 1) != keepdims
    ):
        raise NoMatch(v, f"ReduceSum over axis {axis} (keepdims={keepdims}) of {src.name}", found_op(v))


def _check_ranks(value: ir.Value, kpm: ir.Value) -> None:
    """value = the rank of each real token among its row's real tokens: CumSum(kpm, 1) - 1, or the
    exclusive CumSum(kpm, 1); on padded tokens the two differ, but those are masked out."""
    v = _uncast(value)
    sub = producer(v, "Sub")
    exclusive = 0 if sub is not None and const_scalar(sub.inputs[1]) == 1 else 1
    cum_value = _uncast(sub.inputs[0]) if exclusive == 0 else v
    cum = producer(cum_value, "CumSum")
    if (
        cum is None
        or _uncast(cum.inputs[0]) is not kpm
        or const_scalar(cum.inputs[1]) not in (1, -1)
        or attr(cum, "reverse", 0) != 0
        or attr(cum, "exclusive", 0) != exclusive
    ):
        raise NoMatch(
            cum_value, "token ranks CumSum(kpm, axis=1) - 1 or CumSum(kpm, axis=1, exclusive=1)", found_op(cum_value)
        )


def _check_segments(value: ir.Value, kpm: ir.Value, landmarks: int) -> None:
    """value = floor(rank * L / max(n, 1)), n a row's real tokens: Floor of a float Div or an integer
    Div (truncation: the same on real tokens, whose ranks are >= 0)."""
    v = _uncast(value)
    floor = producer(v, "Floor")
    div = producer(_uncast(floor.inputs[0]) if floor is not None else v, "Div")
    if div is None:
        raise NoMatch(v, "segment ids floor(rank * L / n) (Div, optionally Floor)", found_op(v))
    _check_row_sum(_clamped_to_one(div.inputs[1]), kpm, axis=1, keepdims=1)
    num = _uncast(div.inputs[0])
    mul = producer(num, "Mul")
    for ranks, times in (mul.inputs, mul.inputs[::-1]) if mul is not None else ():
        if const_scalar(times) == landmarks:
            _check_ranks(ranks, kpm)
            return
    raise NoMatch(num, f"rank * {landmarks} (Mul by the landmark count)", found_op(num))


def _check_membership(member: ir.Value, kpm: ir.Value, landmarks: int) -> None:
    """member [B,L,T] = (Unsqueeze(segment, 1) == arange(L)[:, None]) & Unsqueeze(kpm, 1)."""
    and_ = producer(member, "And")
    for eq, unsq in (and_.inputs, and_.inputs[::-1]) if and_ is not None else ():
        node = producer(unsq, "Unsqueeze")
        if node is not None and node.inputs[0] is kpm and norm_axes(axes_of(node) or [], 3) == [1]:
            break
    else:
        raise NoMatch(member, "segment membership And(Equal(...), Unsqueeze(kpm, 1))", found_op(member))
    equal = producer(eq, "Equal")
    for seg, ids in (equal.inputs, equal.inputs[::-1]) if equal is not None else ():
        arr, node = const_array(ids), producer(seg, "Unsqueeze")
        if (
            arr is not None
            and arr.shape in ((landmarks, 1), (1, landmarks, 1))
            and np.issubdtype(arr.dtype, np.integer)
            and np.array_equal(arr.reshape(-1), np.arange(landmarks))
            and node is not None
            and norm_axes(axes_of(node) or [], 3) == [1]
        ):
            _check_segments(node.inputs[0], kpm, landmarks)
            return
    raise NoMatch(eq, f"Equal(Unsqueeze(segment ids, 1), arange({landmarks}) as [L, 1])", found_op(eq))


def match_segment_pooling(weights: ir.Value, landmark_mask: ir.Value, kpm: ir.Value, landmarks: int) -> None:
    """Prove from the graph that (weights [B,L,T], landmark_mask [B,L]) are segment_weights(kpm, L):
    weights = member / max(sum_t member, 1), landmark_mask = sum_t member > 0, member the real
    tokens whose segment floor(rank * L / n) is l. Raises NoMatch at the first step that differs."""
    if kpm.dtype != ir.DataType.BOOL or rank(kpm) != 2:
        raise NoMatch(kpm, "a bool [B,T] key padding mask", f"{kpm.dtype} of rank {rank(kpm)}")
    div = producer(weights, "Div")
    member = _uncast(div.inputs[0]) if div is not None else None
    if member is None or member.dtype != ir.DataType.BOOL:
        raise NoMatch(weights, "weights = Cast(member) / max(count, 1), member bool", found_op(weights))
    _check_row_sum(_clamped_to_one(div.inputs[1]), member, axis=2, keepdims=1)
    _check_membership(member, kpm, landmarks)
    greater = producer(landmark_mask, "Greater")
    if greater is None or const_scalar(greater.inputs[1]) != 0:
        raise NoMatch(landmark_mask, "landmark mask = count > 0", found_op(landmark_mask))
    count = _uncast(greater.inputs[0])
    squeeze = producer(count, "Squeeze")
    if squeeze is not None and norm_axes(axes_of(squeeze) or [], 3) == [2]:
        _check_row_sum(squeeze.inputs[0], member, axis=2, keepdims=1)
    else:
        _check_row_sum(count, member, axis=2, keepdims=0)


# ---------------------------------------------------------------------------------------------
# the whole core
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LandmarkCore:
    """A matched iMHSA core: q, k, v [B,N,T,d], key padding mask, scale, pre mixes, landmarks."""

    q: ir.Value
    k: ir.Value
    v: ir.Value
    kpm: ir.Value
    scale: float
    mixes: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # M_q, c_q, M_k, c_k
    landmarks: int


def _need(found, where: ir.Value | ir.Node, expected: str):
    """``found`` when it is not None, else NoMatch at ``where``."""
    if found is None:
        raise NoMatch(where, expected, found_op(where) if isinstance(where, ir.Value) else where.op_type)
    return found


def match_landmark(final: ir.Node) -> LandmarkCore:
    """final = A_Q @ (A_K @ v) of an iMHSA core -> its LandmarkCore; NoMatch says why not."""
    aq, akv = final.inputs
    inner = producer(akv, "MatMul")
    if inner is None or not single_use(akv):
        raise NoMatch(akv, "A_K @ v used once", found_op(akv))
    ak, v = inner.inputs
    s_q, m_q, c_q, landmark_mask = _need(_attention_side(aq), aq, "masked softmax over landmarks (query side)")
    s_k, m_k, c_k, kpm = _need(_attention_side(ak), ak, "masked softmax over keys (landmark side)")
    q, k_land, scale_q = _need(_thin_map(s_q), s_q, "scale * q @ Transpose(k~)")
    q_land, k, scale_k = _need(_thin_map(s_k), s_k, "scale * q~ @ Transpose(k)")
    pq = _need(_pooled(q_land), q_land, "Unsqueeze(W, 1) @ q")
    pk = _need(_pooled(k_land), k_land, "Unsqueeze(W, 1) @ k")
    if pq[0] is not pk[0] or pq[1] is not q or pk[1] is not k:
        raise NoMatch(final, "q~ and k~ pooled from this q and k by one W", "other operands")
    weights = pq[0]
    dq, dk, dv, dw = dims(q), dims(k), dims(v), dims(weights)
    if None in (dq, dk, dv, dw) or len(dq) != 4 or dq != dk or len(dv) != 4 or not isinstance(dw[1], int):
        raise NoMatch(final, "q, k, v [B,N,T,d] and W [B,L,T] with a static L", f"{dq}, {dk}, {dv}, {dw}")
    if not same_dim(dv[2], dq[2]) or not same_dim(dv[1], dq[1]) or not np.isclose(scale_q, scale_k, rtol=1e-6):
        raise NoMatch(final, "v's heads and tokens those of q, one scale", f"{dv} vs {dq}, {scale_q} vs {scale_k}")
    match_segment_pooling(weights, landmark_mask, kpm, dw[1])
    return LandmarkCore(q, k, v, kpm, float(scale_q), (m_q, c_q, m_k, c_k), dw[1])


def core_end(soft: ir.Node) -> ir.Node | None:
    """The A_Q @ (A_K @ v) a softmax of an iMHSA-shaped core feeds, if any (for --explain)."""
    value = soft.outputs[0]
    uses = list(value.uses())
    if len(uses) == 1 and uses[0].node.op_type == "Where":
        value = uses[0].node.outputs[0]
    for use in value.uses():
        mm = use.node
        if mm.op_type != "MatMul" or use.idx != 0:
            continue
        outer = [u.node for u in mm.outputs[0].uses() if u.node.op_type == "MatMul" and u.idx == 1]
        if outer:
            return outer[0]
        if producer(mm.inputs[1], "MatMul") is not None:
            return mm
    return None


def _emit(final: ir.Node, core: LandmarkCore) -> None:
    """Replace ``final`` by LandmarkAttention(core) (no post mix: identity and zeros)."""
    n = dims(core.q)[1]
    b = Builder(final, "imhsa")
    qq, kk, vv = (transposed(b, x, [0, 2, 1, 3]) for x in (core.q, core.k, core.v))
    eye, zeros = np.eye(n, dtype=np.float32), np.zeros(n, dtype=np.float32)
    m_q, c_q, m_k, c_k = core.mixes
    consts = [
        b.const(a, name)
        for a, name in (
            (m_q, "pre_mix_q"),
            (c_q, "pre_bias_q"),
            (m_k, "pre_mix_k"),
            (c_k, "pre_bias_k"),
            (eye, "post_mix_q"),
            (zeros, "post_bias_q"),
            (eye, "post_mix_k"),
            (zeros, "post_bias_k"),
        )
    ]
    dq, dv = dims(core.q), dims(core.v)
    o = b.op(
        "LandmarkAttention",
        [qq, kk, vv, core.kpm, *consts],
        {"landmarks": core.landmarks, "grid": 0, "scale": core.scale},
        domain=DOMAIN,
        dtype=core.q.dtype,
        shape=(dq[0], dq[2], n, dv[3]),
    )
    replace_value(final.outputs[0], transposed(b, o, [0, 2, 1, 3]))


def _fuse_landmark(model: ir.Model, final: ir.Node) -> bool:
    try:
        core = match_landmark(final)
    except NoMatch as why:
        logger.debug("MatMul %r is not an iMHSA core: %s", final.name, why)
        return False
    if not ensure_function(model, "LandmarkAttention"):
        return False
    _emit(final, core)
    logger.debug("LandmarkAttention (L=%d) replaces MatMul %r", core.landmarks, final.name)
    return True


def fuse_landmark_attention(model: ir.Model) -> int:
    """Replace each iMHSA core ending in A_Q @ (A_K @ v) by a LandmarkAttention node."""
    return fuse_each(
        model,
        "LandmarkAttention",
        lambda n: n.op_type == "MatMul" and n.domain == "" and rank(n.outputs[0]) == 4,
        _fuse_landmark,
    )


class FuseImhsaPass(FusionPass):
    """iMHSA cores -> LandmarkAttention."""

    op_type = "LandmarkAttention"

    def fuse(self, model: ir.Model) -> int:
        return fuse_landmark_attention(model)
