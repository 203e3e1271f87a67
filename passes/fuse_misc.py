"""Fuse other decomposed patterns into ``ai.attn2onnx`` ops.

* super attention's left token mix written in plain PyTorch, ``WA[:T,:T] @ x`` (optionally
  ``tril(WA[:T,:T])`` and ``x * mask[..., None]``), with WA a constant [Lmax, Lmax] -> one
  SuperMix node (computed once per layer, whatever the number of heads). Without a padding
  mask in the pattern the node gets an all-true mask (exactly the same computation).
* reuse probability passing (variants.md §7): a softmax attention ``softmax(where(allowed,
  s q k^T, NEG)) @ v`` whose probabilities are used again (sliced by later layers, concatenated
  and passed on) -> one ProbAttention node; its ``o`` replaces the ``@ v`` and its ``probs``
  every other use of the softmax. An attention whose probabilities feed only its ``@ v`` is left
  to ``lower_attention``.
* the iMHSA core (variants.md §6) -> one LandmarkAttention node: pooling ``Unsqueeze(W, 1) @ q``
  and ``@ k`` by one [B,L,T] averaging matrix W, the key-less map ``s q k~^T`` and the query-less
  map ``s q~ k^T``, an optional pre head mix on each (``Einsum('gh,bhxy->bgxy', M, S) + c`` or
  the head axis moved last, ``@ M^T + c`` and moved back; constant M, c), the masked softmaxes
  (landmark mask / key padding mask, each optionally re-zeroed by ``where(allowed, A, 0)`` as the
  op does; without it the plain graph differs from the op only on a row with no real token at
  all, uniform weights there where the op gives 0) and ``A_Q (A_K v)``. The pooling must be the
  op's: W and the landmark mask must be computed from the key padding mask (a graph input) and
  constants alone, and the pass runs that subgraph in ORT on probe masks (several lengths, padded,
  scattered and empty rows) and fuses only if it equals
  :func:`attn2onnx.custom_ops._attention_math.segment_weights` everywhere.
  Not matched: post (after-softmax) mixing, grid pooling, reshape-mean pooling, einsum pooling.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ._ir_utils import (
    DOMAIN,
    fuse_each,
    Builder,
    attr,
    axes_of,
    const_array,
    const_ints,
    const_scalar,
    dims,
    ensure_function,
    norm_axes,
    op_available,
    producer,
    rank,
    replace_value,
    same_dim,
    to_proto,
)
from ._match import scaled as _scaled
from ._match import single_use as _single_use
from ._match import where_mask as _mask
from .fuse_dcmha import _qk, _transposed


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


# ---------------------------------------------------------------------------------------------
# reuse: probability-producing attention -> ProbAttention
# ---------------------------------------------------------------------------------------------
def _fuse_prob(model: ir.Model, soft: ir.Node) -> bool:
    """softmax(where(allowed, s q k^T, NEG)) whose probabilities are used besides one ``@ v``."""
    probs = soft.outputs[0]
    a_dims = dims(probs)
    if a_dims is None or len(a_dims) != 4 or attr(soft, "axis", -1) % 4 != 3:
        return False
    uses = list(probs.uses())
    pv = next((u.node for u in uses if u.node.op_type == "MatMul" and u.node.domain == "" and u.idx == 0
               and rank(u.node.inputs[1]) == 4), None)
    if pv is None or (len(uses) < 2 and not probs.is_graph_output()):
        return False
    masked = soft.inputs[0]
    if not _single_use(masked):
        return False
    found = _mask(masked, a_dims)
    if found is None:
        return False
    logits, parts = found
    qk = _qk(logits)
    dv = dims(pv.inputs[1])
    if qk is None or dv is None or not same_dim(dv[1], a_dims[1]) or not same_dim(dv[2], a_dims[3]):
        return False
    if not ensure_function(model, "ProbAttention"):
        return False
    make_q, make_k, scale = qk
    b = Builder(model.graph, pv, "reuse")
    q, k, v = make_q(b), make_k(b), _transposed(b, pv.inputs[1], [0, 2, 1, 3])
    kpm = parts.get("kpm")
    if kpm is None:
        shape = b.op("Shape", [k], {"start": 0, "end": 2}, dtype=ir.DataType.INT64, shape=(2,))
        kpm = b.op("Expand", [b.const(np.array(True), "true"), shape], dtype=ir.DataType.BOOL, shape=(a_dims[0], a_dims[3]))
    o, p = b.op("ProbAttention", [q, k, v, kpm], {"scale": float(scale), "causal": int(parts.get("causal", 0))},
                domain=DOMAIN, num_outputs=2)
    o.dtype, p.dtype = masked.dtype, probs.dtype
    o.shape = ir.Shape([a_dims[0], a_dims[2], a_dims[1], dv[3]])
    p.shape = ir.Shape(list(a_dims))
    replace_value(pv.outputs[0], _transposed(b, o, [0, 2, 1, 3]))
    replace_value(probs, p)
    return True


def fuse_prob_attention(model: ir.Model) -> int:
    """Replace each probability-producing softmax attention by a ProbAttention node."""
    return fuse_each(model, "ProbAttention", lambda n: n.op_type == "Softmax" and n.domain == "", _fuse_prob)


# ---------------------------------------------------------------------------------------------
# iMHSA core -> LandmarkAttention
# ---------------------------------------------------------------------------------------------
def _folded(value: ir.Value | None) -> np.ndarray | None:
    """A constant, also through Unsqueeze / Reshape / Transpose nodes of constants."""
    arr = const_array(value)
    if arr is not None or value is None:
        return arr
    node = producer(value, ("Unsqueeze", "Reshape", "Transpose"))
    if node is None or (src := _folded(node.inputs[0])) is None:
        return None
    if node.op_type == "Transpose":
        perm = attr(node, "perm")
        return np.transpose(src, perm) if perm is not None else src.T
    d = dims(value)
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
    eq = str(attr(ein, "equation", "")).replace(" ", "")
    if "->" not in eq or "..." in eq:
        return None
    lhs, out = eq.split("->")
    terms = lhs.split(",")
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
    inner, scale = _scaled(value)
    mm = producer(inner, "MatMul")
    if mm is None:
        return None
    a, sa = _scaled(mm.inputs[0])
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
    found = _mask(soft.inputs[0], a_dims)
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


def _pooling_is_segments(model: ir.Model, weights: ir.Value, landmark_mask: ir.Value, kpm: ir.Value,
                         landmarks: int) -> bool:
    """Run the subgraph making (weights, landmark_mask) from kpm on probe masks; True when it
    equals the op's pooling (segment_weights) on all of them."""
    import onnx
    import onnx.utils
    import onnxruntime as ort
    import torch

    from attn2onnx.custom_ops._attention_math import segment_weights

    if not kpm.is_graph_input() or kpm.dtype != ir.DataType.BOOL:
        return False
    # every leaf of the subgraph must be kpm or a constant
    stack, seen = [weights, landmark_mask], set()
    while stack:
        v = stack.pop()
        if v is None or id(v) in seen or v is kpm or const_array(v) is not None:
            continue
        seen.add(id(v))
        node = v.producer()
        if node is None or node.domain != "" or any(sub for sub in node.attributes.values()
                                                    if sub.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)):
            return False
        stack.extend(node.inputs)
    try:
        sub = onnx.utils.Extractor(to_proto(model)).extract_model([kpm.name], [weights.name, landmark_mask.name])
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = 1
        sess = ort.InferenceSession(sub.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        for t in (1, 2, 3, 5, 7, 8, 12, 17):
            mask = np.ones((4, t), dtype=bool)
            mask[1, t - t // 3:] = False
            mask[2] = rng.random(t) < 0.6
            mask[3] = False
            w, lm = sess.run(None, {kpm.name: mask})
            ref_w, ref_lm = segment_weights(torch.from_numpy(mask), landmarks, 0, torch.float32)
            if w.shape != tuple(ref_w.shape) or not np.allclose(w, ref_w.numpy(), rtol=1e-6, atol=1e-7) \
                    or not np.array_equal(np.asarray(lm, dtype=bool), ref_lm.numpy()):
                return False
    except Exception:  # noqa: BLE001 - a subgraph that does not run as expected is simply not ours
        return False
    return True


def _fuse_landmark(model: ir.Model, final: ir.Node) -> bool:
    """final = A_Q @ (A_K @ v) of an iMHSA core -> LandmarkAttention."""
    aq, akv = final.inputs
    inner = producer(akv, "MatMul")
    if inner is None or not _single_use(akv):
        return False
    ak, v = inner.inputs
    side_q, side_k = _attention_side(aq), _attention_side(ak)
    if side_q is None or side_k is None:
        return False
    s_q, m_q, c_q, landmark_mask = side_q
    s_k, m_k, c_k, kpm = side_k
    map_q, map_k = _thin_map(s_q), _thin_map(s_k)
    if map_q is None or map_k is None:
        return False
    q, k_land, scale_q = map_q
    q_land, k, scale_k = map_k
    pq, pk = _pooled(q_land), _pooled(k_land)
    if pq is None or pk is None or pq[0] is not pk[0] or pq[1] is not q or pk[1] is not k:
        return False
    weights = pq[0]
    dq, dk, dv, dw = dims(q), dims(k), dims(v), dims(weights)
    if None in (dq, dk, dv, dw) or len(dq) != 4 or dq != dk or len(dv) != 4 or not isinstance(dw[1], int):
        return False
    if not same_dim(dv[2], dq[2]) or not same_dim(dv[1], dq[1]) or not np.isclose(scale_q, scale_k, rtol=1e-6):
        return False
    landmarks = dw[1]
    if not _pooling_is_segments(model, weights, landmark_mask, kpm, landmarks):
        return False
    if not ensure_function(model, "LandmarkAttention"):
        return False
    n = dq[1]
    b = Builder(model.graph, final, "imhsa")
    qq, kk, vv = (_transposed(b, x, [0, 2, 1, 3]) for x in (q, k, v))
    eye, zeros = np.eye(n, dtype=np.float32), np.zeros(n, dtype=np.float32)
    consts = [b.const(a, name) for a, name in ((m_q, "pre_mix_q"), (c_q, "pre_bias_q"), (m_k, "pre_mix_k"),
                                                (c_k, "pre_bias_k"), (eye, "post_mix_q"), (zeros, "post_bias_q"),
                                                (eye, "post_mix_k"), (zeros, "post_bias_k"))]
    o = b.op("LandmarkAttention", [qq, kk, vv, kpm, *consts],
             {"landmarks": int(landmarks), "grid": 0, "scale": float(scale_q)},
             domain=DOMAIN, dtype=q.dtype, shape=(dq[0], dq[2], n, dv[3]))
    replace_value(final.outputs[0], _transposed(b, o, [0, 2, 1, 3]))
    return True


def fuse_landmark_attention(model: ir.Model) -> int:
    """Replace each iMHSA core ending in A_Q @ (A_K @ v) by a LandmarkAttention node."""
    return fuse_each(model, "LandmarkAttention",
                     lambda n: n.op_type == "MatMul" and n.domain == "" and rank(n.outputs[0]) == 4, _fuse_landmark)


class FuseMiscPass(ir.passes.InPlacePass):
    """SuperMix, LandmarkAttention (iMHSA cores), ProbAttention (reuse producers); ``counts``
    after a run says how many of each were made."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        mixes = fuse_super_mix(model)
        landmarks = fuse_landmark_attention(model)
        probs = fuse_prob_attention(model)
        self.counts = {"SuperMix": mixes, "LandmarkAttention": landmarks, "ProbAttention": probs}
        return ir.passes.PassResult(model, bool(mixes or landmarks or probs))
