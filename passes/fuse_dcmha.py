"""Fuse DCMHA written in plain PyTorch into ``ai.attn2onnx`` DcmhaCompose / DcmhaAttention nodes.

A compose step (variants.md §5) is a *sum*: ``a + Σ rank terms + gates (+ static mix)``. Written
in PyTorch it reaches ONNX as a tree of ``Add`` nodes whose leaves are the tensor ``a`` itself and
terms computed from ``a``. The pass therefore works on whole Add trees rather than on fixed-size
patterns (the number of terms, their order and their grouping vary with the rank, the style and
the options), with one recogniser per way of writing a term:

* rank-1 broadcast terms, ``Unsqueeze(ReduceSum(a * U, heads)) * V`` (DCFormer's loop over rank);
* rank-R einsum pairs, ``Einsum(Einsum(a, U) -> [b,t,s,r], V) -> [b,n,t,s]`` (any letters);
* batched-MatMul terms on permuted ``a``: ``(a^T U^T) V`` pairs, or one merged per-position
  ``N x N`` matrix ``U^T V + diag(g) (+ Wb)`` (also gathered out of a matrix stacked over slots);
* gates ``a * g`` broadcast over keys (query side) or queries (key side);
* static head mixes ``Einsum('bnts,nm->bmts', a, Wb)``.

Every recogniser checks the axes from the value shapes the exporter records (batch, heads = a
static N, query and key axes), so a term that reduces over the wrong axis, factors with another
head count, or factors broadcast over the batch are left alone. A tree is fused when its leaves
hold ``a`` exactly once, at least one rank term, and nothing but terms of ``a``.

Then, when the whole core is there -- ``q k^T`` (scaled), pre compose, a recognised mask
(key padding ``[B,1,1,S]``, causal ``tril``, the release's causal / window buffers, or any other
bool tensor, which becomes the op's ``attn_mask`` input), softmax, post compose, ``@ v`` -- it
becomes one DcmhaAttention node. The ops' standard-op bodies are attached from
``attn2onnx.custom_ops.function_protos()``; nothing is inlined.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx_ir as ir

from ._match import perm_of as _perm_of
from ._match import single_use as _single_use
from ._match import where_mask as _mask
from ._match import qk_product as _qk
from ._match import transposed as _transposed
from ._match import parse_equation
from .fuse_dcmha_release import input_mask, prepare_release_forms, release_mask
from ._ir_utils import (
    DOMAIN,
    fuse_each,
    Builder,
    attr,
    axes_of,
    const_array,
    dims,
    ensure_function,
    norm_axes,
    op_available,
    producer,
    rank,
    replace_value,
    same_dim,
    scope_nodes,
    tree_leaves,
)

# Transposes between [B,N,T,S] and the position-major layouts the batched-MatMul styles use.
_Q_PERM_IN, _Q_PERM_OUT = (0, 2, 3, 1), (0, 3, 1, 2)  # [B,T,S,N] and back
_K_PERM_IN, _K_PERM_OUT = (0, 3, 2, 1), (0, 3, 2, 1)  # [B,S,T,N] and back
# From a [B,N,T,1] / [B,N,1,S] broadcast factor to the factor layout [B,X,1,N].
_FACTOR_PERM = {"q": [0, 2, 3, 1], "k": [0, 3, 2, 1]}


@dataclass
class Term:
    """One leaf of a compose sum, recognised as a function of ``a``."""

    a: ir.Value
    kind: str  # "lowrank" | "gate" | "static"
    side: str | None  # "q" | "k" | None (static)
    rank: int = 0
    make: Callable[[Builder], tuple[ir.Value, ...]] = field(default=lambda b: ())
    # lowrank -> (U [B,X,r,N], V [B,X,r,N]); gate -> (g [B,X,1,N],); static -> (W [N,N],)


# ---------------------------------------------------------------------------------------------
# shape helpers
# ---------------------------------------------------------------------------------------------
def _heads_tensor(a: ir.Value) -> tuple | None:
    """(B, N, T, S) of a [B,N,T,S] tensor with a static head count."""
    d = dims(a)
    if d is None or len(d) != 4 or not isinstance(d[1], int):
        return None
    return d


def _side(f: ir.Value, a: ir.Value) -> str | None:
    """Side of a per-(head, token) factor broadcast against a [B,N,T,S]: "q" for [B,N,T,1],
    "k" for [B,N,1,S]; None when it is anything else (other head count, batch broadcast...)."""
    da, df = _heads_tensor(a), dims(f)
    if da is None or df is None or len(df) != 4:
        return None
    b, n, t, s = da
    if not same_dim(df[0], b) or df[1] != n:
        return None
    if same_dim(df[2], t) and df[3] == 1 and t != 1:
        return "q"
    if df[2] == 1 and same_dim(df[3], s) and s != 1:
        return "k"
    return None


def _full(x: ir.Value, a_dims: tuple | None) -> bool:
    d = _heads_tensor(x)
    return d is not None and a_dims is not None and all(same_dim(p, q) for p, q in zip(d, a_dims))


# ---------------------------------------------------------------------------------------------
# term recognisers
# ---------------------------------------------------------------------------------------------
def _reduced_over_heads(x: ir.Value) -> tuple[ir.Value, ir.Value] | None:
    """x = sum over heads (axis 1, kept or re-unsqueezed) of a * f -> (a, f)."""
    node = producer(x, "Unsqueeze")
    if node is not None:
        axes = axes_of(node)
        if axes is None or rank(x) != 4 or norm_axes(axes, 4) != [1]:
            return None
        red = producer(node.inputs[0], "ReduceSum")
        keep = 0
    else:
        red = producer(x, "ReduceSum")
        keep = 1
    if red is None or attr(red, "keepdims", 1) != keep or rank(red.inputs[0]) != 4:
        return None
    axes = axes_of(red)
    if axes is None or norm_axes(axes, 4) != [1]:
        return None
    mul = producer(red.inputs[0], "Mul")
    if mul is None:
        return None
    out_dims = dims(mul.outputs[0])
    for a, f in ((mul.inputs[0], mul.inputs[1]), (mul.inputs[1], mul.inputs[0])):
        if _full(a, out_dims) and _side(f, a):
            return a, f
    return None


def _broadcast_terms(leaf: ir.Value) -> Term | None:
    """DCFormer rank-1 term ``sum_n(a * u) * v`` or a gate ``a * g`` (factors broadcast [B,N,T|1,1|S])."""
    mul = producer(leaf, "Mul")
    if mul is None:
        return None
    x, y = mul.inputs
    for hid, fv in ((x, y), (y, x)):
        found = _reduced_over_heads(hid)
        if found is None:
            continue
        a, fu = found
        side = _side(fu, a)
        if side is None or _side(fv, a) != side:
            return None
        perm = _FACTOR_PERM[side]
        return Term(
            a,
            "lowrank",
            side,
            1,
            lambda b, fu=fu, fv=fv, perm=perm: (_transposed(b, fu, perm), _transposed(b, fv, perm)),
        )
    out_dims = dims(leaf)
    for a, g in ((x, y), (y, x)):
        if _full(a, out_dims):
            side = _side(g, a)
            if side is not None:
                perm = _FACTOR_PERM[side]
                return Term(a, "gate", side, 0, lambda b, g=g, perm=perm: (_transposed(b, g, perm),))
    return None


def _einsum_terms(leaf: ir.Value) -> Term | None:
    """``Einsum(Einsum(a, U) -> [b,t,s,r], V) -> [b,n,t,s]`` (rank axis inside the einsums), the
    release's rank-1 pair ``Einsum(Einsum(a, u [b,t|s,n]) -> [b,t,s], v [b,t|s,m]) -> [b,m,t,s]``,
    a gate ``Einsum(a, g [b,t|s,n]) -> [b,n,t,s]`` or a static head mix ``Einsum(a, W) -> [b,m,t,s]``."""
    node = producer(leaf, "Einsum")
    if node is None or len(node.inputs) != 2:
        return None
    parsed = parse_equation(node)
    if parsed is None:
        return None
    (l0, l1), out = parsed
    # static mix: a [b,n,t,s] x W [n,m] -> [b,m,t,s]
    for a, w, la, lw in ((node.inputs[0], node.inputs[1], l0, l1), (node.inputs[1], node.inputs[0], l1, l0)):
        da = _heads_tensor(a)
        if da is None or len(la) != 4 or len(lw) != 2 or dims(w) != (da[1], da[1]):
            continue
        lb, ln, lt, ls = la
        if ln not in lw or len(set(la)) != 4:
            continue
        lm = lw[1 - lw.index(ln)]
        if lm in la or out != lb + lm + lt + ls:
            continue
        perm = [lw.index(ln), lw.index(lm)]
        return Term(a, "static", None, 0, lambda b, w=w, perm=perm: (_transposed(b, w, perm),))
    for a, g, la, lg in ((node.inputs[0], node.inputs[1], l0, l1), (node.inputs[1], node.inputs[0], l1, l0)):
        side = _token_factor(a, g, la, lg)
        if side is not None and out == "".join(la):
            return Term(a, "gate", side[0], 0, lambda b, g=g, perm=side[1]: (_unit_rank(b, g, perm),))
    # rank terms: first einsum a x U -> H, then H x V -> out
    for h, v, lh, lv in ((node.inputs[0], node.inputs[1], l0, l1), (node.inputs[1], node.inputs[0], l1, l0)):
        first = producer(h, "Einsum")
        if first is None or len(first.inputs) != 2:
            continue
        p1 = parse_equation(first)
        if p1 is None:
            continue
        (m0, m1), out1 = p1
        for a, u, la, lu in ((first.inputs[0], first.inputs[1], m0, m1), (first.inputs[1], first.inputs[0], m1, m0)):
            term = _einsum_pair(a, u, la, lu, out1, h, v, lh, lv, out) or _einsum_rank1(
                a, u, la, lu, out1, lh, v, lv, out
            )
            if term is not None:
                return term
    return None


def _token_factor(a: ir.Value, f: ir.Value, la: list[str] | str, lf: list[str] | str) -> tuple[str, list[int]] | None:
    """f [b, t|s, n] in any letter order against a [b,n,t,s] -> (side, perm of f to [b,x,n]),
    checked on the dims (batch, N heads, the side's axis)."""
    da, df = _heads_tensor(a), dims(f)
    if da is None or df is None or len(la) != 4 or len(set(la)) != 4 or len(lf) != 3 or len(set(lf)) != 3:
        return None
    lb, ln, lt, ls = la
    if lb not in lf or ln not in lf or (lt in lf) == (ls in lf):
        return None
    lx, side, dx = (lt, "q", da[2]) if lt in lf else (ls, "k", da[3])
    perm = [lf.index(c) for c in (lb, lx, ln)]
    if not same_dim(df[perm[0]], da[0]) or df[perm[2]] != da[1] or not same_dim(df[perm[1]], dx):
        return None
    return side, perm


def _unit_rank(b: Builder, f: ir.Value, perm: list[int]) -> ir.Value:
    """[B,X,N] factor (after ``perm``) -> [B,X,1,N]."""
    g = _transposed(b, f, perm)
    d = dims(g)
    return b.op("Unsqueeze", [g, b.ints([2])], dtype=g.dtype, shape=(d[0], d[1], 1, d[2]))


def _einsum_rank1(a, u, la, lu, out1, lh, v, lv, out) -> Term | None:
    """The release's rank-1 pair: H [b,t,s] = sum_n a * u [b,x,n]; out [b,m,t,s] = H * v [b,x,m]."""
    side = _token_factor(a, u, la, lu)
    if side is None or len(out1) != 3 or sorted(out1) != sorted(la[:1] + la[2:]) or len(lh) != 3:
        return None
    to_second = dict(zip(out1, lh))  # H's axes: first einsum's letters -> second einsum's
    lb, _, lt, ls = la
    new = [c for c in lv if c not in lh]
    if len(lv) != 3 or len(new) != 1:
        return None
    lm, lx = new[0], to_second[lu[side[1][1]]]
    if out != to_second[lb] + lm + to_second[lt] + to_second[ls] or sorted(lv) != sorted([to_second[lb], lx, lm]):
        return None
    perm_v = [lv.index(c) for c in (to_second[lb], lx, lm)]
    dv = dims(v)
    if dv is None or dv[perm_v[2]] != dims(a)[1] or not same_dim(dv[perm_v[0]], dims(a)[0]):
        return None
    return Term(a, "lowrank", side[0], 1, lambda b: (_unit_rank(b, u, side[1]), _unit_rank(b, v, perm_v)))


def _einsum_pair(a, u, la, lu, out1, h, v, lh, lv, out) -> Term | None:
    da = _heads_tensor(a)
    if da is None or len(la) != 4 or len(set(la)) != 4 or len(lu) != 4 or len(lh) != 4 or len(lv) != 4:
        return None
    lb, ln, lt, ls = la
    extra = [c for c in lu if c not in la]
    if len(extra) != 1 or lb not in lu or ln not in lu or (lt in lu) == (ls in lu):
        return None
    lr = extra[0]
    side_letter, side = (lt, "q") if lt in lu else (ls, "k")
    if sorted(out1) != sorted([lb, lt, ls, lr]) or len(out1) != 4:
        return None
    # letters of the second einsum, mapped to the first one's through H's axes
    role = {lh[i]: out1[i] for i in range(4)}
    inv = {r: c for c, r in role.items()}
    new = [c for c in lv if c not in lh]
    if len(new) != 1 or any(inv[x] not in lv for x in (lb, side_letter, lr)):
        return None
    lm = new[0]
    if out != inv[lb] + lm + inv[lt] + inv[ls]:
        return None
    du, dv = dims(u), dims(v)
    if du is None or dv is None or du[lu.index(ln)] != da[1] or dv[lv.index(lm)] != da[1]:
        return None
    if not same_dim(du[lu.index(lb)], da[0]) or not same_dim(dv[lv.index(inv[lb])], da[0]):
        return None
    r = du[lu.index(lr)]
    if not isinstance(r, int) or dv[lv.index(inv[lr])] != r:
        return None
    perm_u = [lu.index(c) for c in (lb, side_letter, lr, ln)]
    perm_v = [lv.index(c) for c in (inv[lb], inv[side_letter], inv[lr], lm)]
    return Term(a, "lowrank", side, r, lambda b: (_transposed(b, u, perm_u), _transposed(b, v, perm_v)))


@dataclass
class _Piece:
    kind: str  # lowrank | diag | static
    values: tuple
    gathers: list  # (axis, index value) applied in order to every tensor of the piece


def _decompose_matrix(m: ir.Value, gathers: list) -> list[_Piece] | None:
    """Split a per-position N x N matrix into U^T V, diag(g) and constant Wb pieces: the leaves,
    left to right, of its tree of Adds and Gathers (walked with an explicit stack, so any depth)."""
    pieces: list[_Piece] = []
    stack = [(m, gathers)]
    while stack:
        value, gs = stack.pop()
        node, d = value.producer(), dims(value)
        if d is None or (node is not None and node.op_type != "Constant" and node.domain != ""):
            return None
        if node is not None and node.op_type == "Add":
            stack += [(node.inputs[1], gs), (node.inputs[0], gs)]  # the left one is popped first
            continue
        if node is not None and node.op_type == "Gather":
            index = const_array(node.inputs[1])
            axis = attr(node, "axis", 0) % (len(d) + 1)
            if index is None or index.ndim != 0 or axis >= len(d) - 1:
                return None
            stack.append((node.inputs[0], [(axis, node.inputs[1])] + gs))
            continue
        piece = _matrix_piece(value, node, d, gs)
        if piece is None:
            return None
        pieces.append(piece)
    return pieces


def _matrix_piece(m: ir.Value, node: ir.Node | None, d: tuple, gathers: list) -> _Piece | None:
    """One leaf of :func:`_decompose_matrix`: a constant N x N matrix, U^T V or diag(g)."""
    if node is None or node.op_type == "Constant":
        w = const_array(m)
        if w is None or w.ndim != 2 or w.shape[0] != w.shape[1]:
            return None
        return _Piece("static", (m,), [])
    if node.op_type == "MatMul":
        p, v = node.inputs
        dp, dv = dims(p), dims(v)
        if dp is None or dv is None or len(dp) != len(d) or len(dv) != len(d):
            return None
        return _Piece("lowrank", (p, v), gathers)
    if node.op_type == "Mul":
        for g, eye in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
            e = const_array(eye)
            dg = dims(g)
            if e is None or e.ndim != 2 or e.shape[0] != e.shape[1] or not np.array_equal(e, np.eye(e.shape[0])):
                continue
            if dg is None or len(dg) != len(d) or 1 not in dg[-2:]:
                continue
            return _Piece("diag", (g,), gathers)
    return None


def _gathered(b: Builder, x: ir.Value, gathers: list) -> ir.Value:
    for axis, index in gathers:
        d = dims(x)
        shape = None if d is None else d[:axis] + d[axis + 1 :]
        x = b.op("Gather", [x, index], {"axis": axis}, dtype=x.dtype, shape=shape)
    return x


def _gathered_dims(x: ir.Value, gathers: list) -> tuple | None:
    d = dims(x)
    if d is None:
        return None
    for axis, _ in gathers:
        d = d[:axis] + d[axis + 1 :]
    return d


def _matmul_terms(leaf: ir.Value) -> list[Term] | None:
    """Batched-MatMul forms on position-major ``a``: ``T(T(a) @ M)`` with M a merged N x N matrix
    per position, or ``T((T(a) @ U^T) @ V)``."""
    out_t = producer(leaf, "Transpose")
    if out_t is None:
        return None
    mm = producer(out_t.inputs[0], "MatMul")
    if mm is None:
        return None
    z, m = mm.inputs
    inner = producer(z, "MatMul")
    perm_t = producer(z if inner is None else inner.inputs[0], "Transpose")
    if perm_t is None:
        return None
    a = perm_t.inputs[0]
    da = _heads_tensor(a)
    if da is None:
        return None
    b_, n, t, s = da
    pin, pout = _perm_of(perm_t), _perm_of(out_t)
    if (pin, pout) == (_Q_PERM_IN, _Q_PERM_OUT):
        side, lead = "q", (b_, t)
    elif (pin, pout) == (_K_PERM_IN, _K_PERM_OUT):
        side, lead = "k", (b_, s)
    else:
        return None

    def lead_ok(d: tuple | None, tail: tuple) -> bool:
        return (
            d is not None
            and len(d) == 4
            and same_dim(d[0], lead[0])
            and same_dim(d[1], lead[1])
            and all(x == y or y is None for x, y in zip(d[2:], tail))
        )

    if inner is not None:  # (a^T @ Ut) @ V, Ut [B,X,N,R], V [B,X,R,N]
        ut = inner.inputs[1]
        du, dv = dims(ut), dims(m)
        if du is None or dv is None or not isinstance(du[3], int):
            return None
        r = du[3]
        if not lead_ok(du, (n, r)) or not lead_ok(dv, (r, n)):
            return None
        return [Term(a, "lowrank", side, r, lambda bld: (_transposed(bld, ut, [0, 1, 3, 2]), m))]

    pieces = _decompose_matrix(m, [])
    if pieces is None:
        return None
    terms: list[Term] = []
    for piece in pieces:
        if piece.kind == "static":
            w = piece.values[0]
            if dims(w) != (n, n):
                return None
            terms.append(Term(a, "static", None, 0, lambda bld, w=w: (w,)))
        elif piece.kind == "diag":
            g = piece.values[0]
            dg = _gathered_dims(g, piece.gathers)
            if dg is None or len(dg) != 4:
                return None
            perm = [0, 1, 3, 2] if dg[3] == 1 else [0, 1, 2, 3]
            if not lead_ok(dg, (n, 1) if dg[3] == 1 else (1, n)):
                return None
            terms.append(
                Term(
                    a,
                    "gate",
                    side,
                    0,
                    lambda bld, g=g, gs=piece.gathers, perm=perm: (_transposed(bld, _gathered(bld, g, gs), perm),),
                )
            )
        else:
            p, v = piece.values
            dp, dv = _gathered_dims(p, piece.gathers), _gathered_dims(v, piece.gathers)
            if dp is None or dv is None or len(dp) != 4 or len(dv) != 4 or not isinstance(dp[3], int):
                return None
            r = dp[3]
            if not lead_ok(dp, (n, r)) or not lead_ok(dv, (r, n)):
                return None

            def make(bld, p=p, v=v, gs=piece.gathers):
                pt = producer(p, "Transpose")
                if (
                    pt is not None
                    and len(_perm_of(pt) or ()) == rank(p)
                    and list(_perm_of(pt)) == list(range(rank(p) - 2)) + [rank(p) - 1, rank(p) - 2]
                ):
                    u = _gathered(bld, pt.inputs[0], gs)
                else:
                    u = _transposed(bld, _gathered(bld, p, gs), [0, 1, 3, 2])
                return u, _gathered(bld, v, gs)

            terms.append(Term(a, "lowrank", side, r, make))
    return terms


def classify(leaf: ir.Value) -> list[Term] | None:
    for recogniser in (_broadcast_terms, _einsum_terms):
        term = recogniser(leaf)
        if term is not None:
            return [term]
    return _matmul_terms(leaf)


# ---------------------------------------------------------------------------------------------
# Add trees -> DcmhaCompose
# ---------------------------------------------------------------------------------------------
def _interior_add(value: ir.Value) -> bool:
    uses = list(value.uses())
    return (
        not value.is_graph_output() and len(uses) == 1 and uses[0].node.op_type == "Add" and uses[0].node.domain == ""
    )


def _zero_rows(b: Builder, ref: ir.Value, count: int) -> list[ir.Value]:
    """``count`` rows of zeros shaped like one row (axis 2) of ``ref`` [B,X,r,N]."""
    if count <= 0:
        return []
    d = dims(ref)
    row = b.op("Slice", [ref, b.ints([0]), b.ints([1]), b.ints([2])], dtype=ref.dtype, shape=(d[0], d[1], 1, d[3]))
    zero = b.const(np.zeros((), dtype=ref.dtype.numpy()), "zero")
    z = b.op("Mul", [row, zero], dtype=ref.dtype, shape=(d[0], d[1], 1, d[3]))
    return [z] * count


def _concat(b: Builder, parts: list[ir.Value], axis: int) -> ir.Value:
    if len(parts) == 1:
        return parts[0]
    ds = [dims(p) for p in parts]
    shape = None
    if all(d is not None for d in ds):
        total = sum(d[axis] for d in ds) if all(isinstance(d[axis], int) for d in ds) else None
        shape = list(ds[0])
        shape[axis] = total
    return b.op("Concat", parts, {"axis": axis}, dtype=parts[0].dtype, shape=shape)


def _sum(b: Builder, parts: list[ir.Value]) -> ir.Value:
    out = parts[0]
    for p in parts[1:]:
        out = b.op("Add", [out, p], dtype=out.dtype, shape=dims(out))
    return out


def _fuse_tree(root: ir.Node) -> bool:
    leaves = tree_leaves(root.outputs[0], "Add", _interior_add)
    classified: list[tuple[ir.Value, list[Term] | None]] = [(leaf, classify(leaf)) for leaf in leaves]
    by_a: dict[int, list[Term]] = {}
    for _, terms in classified:
        for term in terms or ():
            by_a.setdefault(id(term.a), []).append(term)
    best = None
    for terms in by_a.values():
        a = terms[0].a
        if sum(leaf is a for leaf in leaves) != 1 or not any(t.kind == "lowrank" for t in terms):
            continue
        if best is None or len(terms) > len(best):
            best = terms
    if best is None:
        return False
    a = best[0].a
    # every other leaf must be a term of this compose: a sum with anything else in it (a term
    # over the wrong axis, another head count...) is not a compose, and stays as it is
    for leaf, terms in classified:
        if leaf is not a and (not terms or any(t.a is not a for t in terms)):
            return False
    _, n, t_dim, s_dim = dims(a)
    sides = {s: [t for t in best if t.side == s] for s in ("q", "k")}
    present = [s for s, terms in sides.items() if terms]
    if len(present) == 1 and not same_dim(t_dim, s_dim):
        return False  # query-wise on cross attention: nothing to shape the key side's zero factors from
    b = Builder(root, "dcmha")
    made = {id(t): t.make(b) for t in best}
    ranks = {s: sum(t.rank for t in terms if t.kind == "lowrank") for s, terms in sides.items()}
    r = max(ranks.values())
    factors = {}
    for s in present:
        terms = sides[s]
        us = [made[id(t)][0] for t in terms if t.kind == "lowrank"]
        vs = [made[id(t)][1] for t in terms if t.kind == "lowrank"]
        gates = [made[id(t)][0] for t in terms if t.kind == "gate"]
        ref = (us + gates)[0]
        pad = r - ranks[s]
        gate = _sum(b, gates) if gates else _zero_rows(b, ref, 1)[0]
        factors[s] = _concat(b, us + _zero_rows(b, ref, pad) + vs + _zero_rows(b, ref, pad) + [gate], axis=2)
    for s in ("q", "k"):  # query-wise: the side with no term gets zero factors (T = S: shaped like the other)
        if s not in factors:
            factors[s] = _concat(b, _zero_rows(b, factors[present[0]], 2 * r + 1), axis=2)
    statics = [made[id(t)][0] for t in best if t.kind == "static"]
    mix = _sum(b, statics) if statics else b.const(np.zeros((n, n), dtype=a.dtype.numpy()), "no_static_mix")
    fused = b.op(
        "DcmhaCompose",
        [a, factors["q"], factors["k"], mix],
        {"use_static_mix": int(bool(statics))},
        domain=DOMAIN,
        dtype=a.dtype,
        shape=dims(a),
    )
    replace_value(root.outputs[0], fused)
    return True


def fuse_compose(model: ir.Model) -> int:
    """Replace every recognised compose sum by one DcmhaCompose node. Returns how many."""
    if not op_available("DcmhaCompose"):
        return 0
    count = 0
    for node in reversed(scope_nodes(model)):
        if node.op_type != "Add" or node.domain != "" or node.graph is None:
            continue
        if _interior_add(node.outputs[0]):
            continue
        if _fuse_tree(node):
            count += 1
    if count:
        ensure_function(model, "DcmhaCompose")
        ir.passes.common.RemoveUnusedNodesPass()(model)
    return count


# ---------------------------------------------------------------------------------------------
# whole core -> DcmhaAttention
# ---------------------------------------------------------------------------------------------
def _compose_node(value: ir.Value) -> ir.Node | None:
    return producer(value, "DcmhaCompose", DOMAIN)


def _fuse_core(model: ir.Model, post: ir.Node) -> bool:
    out = post.outputs[0]
    uses = list(out.uses())
    if not _single_use(out) or uses[0].node.op_type != "MatMul" or uses[0].idx != 0:
        return False
    pv = uses[0].node
    v = pv.inputs[1]
    probs = post.inputs[0]
    soft = producer(probs, "Softmax")
    if soft is None or not _single_use(probs) or attr(soft, "axis", -1) % 4 != 3:
        return False
    masked = soft.inputs[0]
    if not _single_use(masked):
        return False
    a_dims = dims(masked)
    found = _mask(masked, a_dims) or release_mask(masked) or input_mask(masked)
    if found is None:
        return False
    pre_out, parts = found
    pre = _compose_node(pre_out)
    if pre is None or not _single_use(pre_out):
        return False
    qk = _qk(pre.inputs[0])
    if qk is None or not _single_use(pre.inputs[0]):
        return False
    make_q, make_k, scale = qk
    dq0, dq1 = dims(pre.inputs[1]), dims(post.inputs[1])
    if dq0 is None or dq1 is None or dq0[2] != dq1[2] or not isinstance(dq0[2], int):
        return False
    dv = dims(v)
    if dv is None or len(dv) != 4:
        return False
    if not ensure_function(model, "DcmhaAttention"):
        return False
    b = Builder(pv, "dcmha")
    q, k = make_q(b), make_k(b)
    vv = _transposed(b, v, [0, 2, 1, 3])
    q_factors = _concat(
        b,
        [
            b.op("Unsqueeze", [f, b.ints([2])], dtype=f.dtype, shape=dims(f)[:2] + (1,) + dims(f)[2:])
            for f in (pre.inputs[1], post.inputs[1])
        ],
        axis=2,
    )
    k_factors = _concat(
        b,
        [
            b.op("Unsqueeze", [f, b.ints([2])], dtype=f.dtype, shape=dims(f)[:2] + (1,) + dims(f)[2:])
            for f in (pre.inputs[2], post.inputs[2])
        ],
        axis=2,
    )
    uses_mix = [attr(c, "use_static_mix", 0) for c in (pre, post)]
    n = a_dims[1]
    mixes = []
    for c, used in zip((pre, post), uses_mix):
        w = c.inputs[3] if used else b.const(np.zeros((n, n), dtype=masked.dtype.numpy()), "no_static_mix")
        mixes.append(b.op("Unsqueeze", [w, b.ints([0])], dtype=w.dtype, shape=(1, n, n)))
    mix = _concat(b, mixes, axis=0)
    kpm = parts.get("kpm")
    if kpm is None:
        shape = b.op("Shape", [k], {"start": 0, "end": 2}, dtype=ir.DataType.INT64, shape=(2,))
        kpm = b.op(
            "Expand", [b.const(np.array(True), "true"), shape], dtype=ir.DataType.BOOL, shape=(a_dims[0], a_dims[3])
        )
    inputs = [q, k, vv, q_factors, k_factors, kpm, mix]
    if parts.get("attn_mask") is not None:
        inputs.append(_op_mask(b, parts["attn_mask"]))
    o = b.op(
        "DcmhaAttention",
        inputs,
        {
            "scale": float(scale),
            "causal": int(parts.get("causal", 0)),
            "window": int(parts.get("window", 0)),
            "use_static_mix": int(any(uses_mix)),
        },
        domain=DOMAIN,
        dtype=masked.dtype,
        shape=(a_dims[0], a_dims[2], n, dv[3]),
    )
    _name_overload(model, o.producer())
    replace_value(pv.outputs[0], _transposed(b, o, [0, 2, 1, 3]))
    return True


def _op_mask(b: Builder, mask: ir.Value) -> ir.Value:
    """A mask that broadcasts onto [B,N,T,S] in one of the op's forms: [T,S] and rank 4 as they
    are, rank 1 / 3 with leading unit axes (their broadcast against the logits is the same)."""
    d = dims(mask)
    if len(d) in (2, 4):
        return mask
    lead = 4 - len(d)
    return b.op("Unsqueeze", [mask, b.ints(list(range(lead)))], dtype=ir.DataType.BOOL, shape=(1,) * lead + d)


def _name_overload(model: ir.Model, node: ir.Node) -> None:
    """A node that passes optional inputs calls its op's overload body (DcmhaAttention's
    ``attn_mask``): name it on the node and attach the body (IR version 10)."""
    from attn2onnx.custom_ops import REGISTRY

    opdef = REGISTRY.get(node.op_type)
    overload = opdef.overload_for([v.name or "" if v is not None else "" for v in node.inputs]) if opdef else None
    if overload is None:
        return
    node.overload = overload.name
    func = ir.serde.deserialize_function(overload.body())
    model.functions.setdefault(func.identifier(), func)
    model.ir_version = max(model.ir_version or 0, 10)


def fuse_attention(model: ir.Model) -> int:
    """Replace q k^T -> compose -> mask -> softmax -> compose -> @ v by one DcmhaAttention node."""
    return fuse_each(model, "DcmhaAttention", lambda n: n.op_type == "DcmhaCompose" and n.domain == DOMAIN, _fuse_core)


class FuseDcmhaPass(ir.passes.InPlacePass):
    """Compose sums -> DcmhaCompose, then whole cores -> DcmhaAttention. ``counts`` after a run
    says how many of each were made."""

    def __init__(self, attention: bool = True) -> None:
        super().__init__()
        self.attention = attention
        self.counts: dict[str, int] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        regrouped = prepare_release_forms(model) if op_available("DcmhaCompose") else 0
        composes = fuse_compose(model)
        cores = fuse_attention(model) if self.attention else 0
        self.counts = {"DcmhaCompose": composes - 2 * cores, "DcmhaAttention": cores}
        return ir.passes.PassResult(model, bool(regrouped or composes or cores))
