"""Matching helpers shared by the graph passes (fuse_dcmha, fuse_dcmha_release, fuse_super_mix,
fuse_reuse, fuse_imhsa, fuse_decode_attention, fuse_standard_attention, lower_attention, explain):
scales, masks, head layouts, einsum equations, the q·k product, and :class:`NoMatch`, the reason a
check failed (node, what was expected, what was found), in the style of onnxscript's
``MatchResult.fail``."""

from __future__ import annotations

import string

import numpy as np
import onnx_ir as ir

from typing import Callable

from ._ir_utils import (
    Builder,
    attr,
    axes_of,
    const_array,
    const_scalar,
    dims,
    norm_axes,
    producer,
    rank,
    same_dim,
    tree_leaves,
)


class NoMatch(Exception):
    """A failed check of a fusion rule: at ``node`` the rule expected ``expected`` and found ``found``."""

    def __init__(self, node: ir.Node | ir.Value | None, expected: str, found: str) -> None:
        self.where = describe(node)
        self.expected, self.found = expected, found
        super().__init__(f"{self.where}: expected {expected}, found {found}")


def describe(item: ir.Node | ir.Value | None) -> str:
    """'<op> <name>' for a node, the producer's description (or 'input <name>') for a value."""
    if isinstance(item, ir.Value):
        node = item.producer()
        return describe(node) if node is not None else f"input {item.name}"
    if item is None:
        return "graph"
    return f"{item.op_type} {item.name!r}"


def found_op(value: ir.Value | None) -> str:
    """What produces ``value``, for a NoMatch's ``found``."""
    if value is None:
        return "no value"
    node = value.producer()
    if node is None:
        return "a graph input or constant" if value.const_value is None else "a constant"
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"


def perm_of(node: ir.Node) -> tuple | None:
    p = attr(node, "perm")
    return None if p is None else tuple(p)


def single_use(value: ir.Value) -> bool:
    return not value.is_graph_output() and len(list(value.uses())) == 1


def scaled(value: ir.Value) -> tuple[ir.Value, float]:
    """Strip scalar Mul / Div by constants: value = inner * scale."""
    scale = 1.0
    while True:
        node = producer(value, ("Mul", "Div"))
        if node is None:
            return value, scale
        c = const_scalar(node.inputs[1])
        if c is not None and rank(node.inputs[1]) in (0, 1):
            if node.op_type == "Div" and c != 0:
                scale /= c
            else:
                scale *= c
            value = node.inputs[0]
            continue
        if node.op_type == "Mul":
            c = const_scalar(node.inputs[0])
            if c is not None and rank(node.inputs[0]) in (0, 1):
                scale *= c
                value = node.inputs[1]
                continue
        return value, scale


def is_all_true(value: ir.Value) -> bool:
    """Whether ``value`` is a boolean constant of all True: a constant, or Expands (any number)
    of one, or a ConstantOfShape of True."""
    while const_array(value) is None and (node := producer(value, "Expand")) is not None:
        value = node.inputs[0]
    arr = const_array(value)
    if arr is not None:
        return arr.dtype == np.bool_ and bool(arr.all())
    node = producer(value, "ConstantOfShape")
    if node is None:
        return False
    fill = attr(node, "value")
    return fill is not None and bool(np.asarray(fill.numpy()).all())


def tril_buffer(value: ir.Value) -> bool:
    """value = Slice(s) starting at 0 of a constant lower-triangular 0/1 (or bool) buffer [1,1,L,L]:
    nanoGPT's ``bias[:, :, :T, :T]``."""
    while (node := producer(value, "Slice")) is not None:
        starts = const_array(node.inputs[1])
        if starts is None or starts.any():
            return False
        value = node.inputs[0]
    arr = const_array(value)
    if arr is None or arr.ndim < 2 or arr.shape[-1] != arr.shape[-2]:
        return False
    square = arr.reshape(-1, *arr.shape[-2:])[0].astype(bool)
    return square.shape[0] == arr.size**0.5 and bool((square == np.tril(np.ones_like(square))).all())


def allowed_parts(value: ir.Value, b_dim, t_dim, s_dim) -> dict | None:
    """Decompose a boolean 'allowed' tensor (or a 0/1 one, nonzero = allowed: ``tril(ones(T, T))``)
    into key padding and causal parts. A tree of Ands is read leaf by leaf (iteratively, so any
    depth): each leaf must decompose, and at most one may be a key padding mask."""
    parts = [_allowed_leaf(leaf, b_dim, t_dim, s_dim) for leaf in tree_leaves(value, "And", lambda _: True)]
    if len(parts) == 1 or any(p is None for p in parts):
        return parts[0] if len(parts) == 1 else None
    return merge_parts(parts)


def _allowed_leaf(value: ir.Value, b_dim, t_dim, s_dim) -> dict | None:
    """:func:`allowed_parts` of a mask that is no And."""
    if tril_buffer(value) and same_dim(t_dim, s_dim):  # tril(ones(T, T)), folded to a constant in a static export
        return {"kpm": None, "causal": 1}
    node = value.producer()
    if node is None or node.domain != "":
        return None
    if node.op_type == "Unsqueeze":
        return _unsqueezed_parts(node, node.inputs[0], b_dim, t_dim, s_dim)
    if node.op_type in ("LessOrEqual", "GreaterOrEqual"):
        keys, queries = node.inputs if node.op_type == "LessOrEqual" else node.inputs[::-1]
        if positions(keys, 0) is not None and positions(keys, 0) is positions(queries, 1) and same_dim(t_dim, s_dim):
            return {"kpm": None, "causal": 1}
        return None
    if node.op_type == "Trilu":
        k = const_scalar(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else 0
        d = dims(value)
        if (
            attr(node, "upper", 1) == 0
            and k == 0
            and (is_all_true(node.inputs[0]) or uniform_const(node.inputs[0]) not in (None, 0.0))
            and d is not None
            and same_dim(d[-1], d[-2])
            and same_dim(t_dim, s_dim)
        ):
            return {"kpm": None, "causal": 1}
    return None


def _unsqueezed_parts(node: ir.Node, src: ir.Value, b_dim, t_dim, s_dim) -> dict | None:
    """allowed_parts of ``src`` [B,S] or [T,S] unsqueezed with ``node``'s axes to [B,1,1,S] / [1,1,T,S]."""
    axes, d = axes_of(node), dims(src)
    if axes is None or d is None or len(d) != 2:
        return None
    axes = norm_axes(axes, 4)
    if axes == [1, 2] and same_dim(d[0], b_dim) and same_dim(d[1], s_dim):
        return {"kpm": src, "causal": 0}
    return allowed_parts(src, b_dim, t_dim, s_dim) if axes == [0, 1] else None


def negated_parts(disallowed: ir.Value, b_dim, t_dim, s_dim) -> dict | None:
    """:func:`allowed_parts` of the allowed positions, read from a boolean mask of the disallowed
    ones (``masked_fill``'s condition): ``Not(allowed)``, an Unsqueeze of one (fairseq's
    ``key_padding_mask.unsqueeze(1).unsqueeze(2)`` of a negated mask), ``tril == 0`` (a causal
    0/1 tril: nonzero = allowed; padding read so would be a float, so only causality counts), and
    the "True = pad" forms: a [B,S] padding mask unsqueezed to [B,1,1,S] as it is (fairseq's and
    ``nn.MultiheadAttention``'s ``key_padding_mask``: ``kpm_pads`` says the fused op needs its
    negation) and ``triu(ones(T, T), 1)`` (the strictly upper triangle: causal). A tree of Ors is
    read leaf by leaf, like :func:`allowed_parts`' Ands."""
    leaves = tree_leaves(disallowed, "Or", lambda _: True)
    parts = [_disallowed_leaf(leaf, b_dim, t_dim, s_dim) for leaf in leaves]
    if len(parts) == 1 or any(p is None for p in parts):
        return parts[0] if len(parts) == 1 else None
    return merge_parts(parts)


def merge_parts(parts: list[dict]) -> dict | None:
    """Masks applied one after another (``And`` of allowed, ``Or`` of disallowed, a
    ``masked_fill`` after another): at most one key padding mask, causal where any is; None otherwise."""
    with_kpm = [p for p in parts if p.get("kpm") is not None]
    if len(with_kpm) > 1:
        return None
    merged = dict(with_kpm[0]) if with_kpm else {"kpm": None}
    merged["causal"] = int(any(p.get("causal", 0) for p in parts))
    return merged


def _disallowed_leaf(disallowed: ir.Value, b_dim, t_dim, s_dim) -> dict | None:
    """:func:`negated_parts` of a mask that is no Or."""
    node = disallowed.producer()
    if node is None or node.domain != "":
        return None
    if node.op_type == "Not":
        return allowed_parts(node.inputs[0], b_dim, t_dim, s_dim)
    if node.op_type == "Unsqueeze" and (inner := producer(node.inputs[0], "Not")) is not None:
        return _unsqueezed_parts(node, inner.inputs[0], b_dim, t_dim, s_dim)
    if node.op_type == "Unsqueeze":
        return _unsqueezed_disallowed(node, b_dim, t_dim, s_dim)
    if node.op_type == "Equal" and const_scalar(node.inputs[1]) == 0:
        parts = allowed_parts(node.inputs[0], b_dim, t_dim, s_dim)
        return parts if parts is not None and parts.get("kpm") is None else None
    if node.op_type == "Trilu" and _strictly_upper(node) and _square(disallowed, t_dim, s_dim):
        source = node.inputs[0]
        if is_all_true(source) or uniform_const(source) not in (None, 0.0):
            return {"kpm": None, "causal": 1}
    return None


def _unsqueezed_disallowed(node: ir.Node, b_dim, t_dim, s_dim) -> dict | None:
    """A "True = pad" mask: a boolean [B,S] unsqueezed to [B,1,1,S] (``kpm_pads``), or a
    disallowed [T,S] unsqueezed to [1,1,T,S]."""
    src, axes, d = node.inputs[0], axes_of(node), dims(node.inputs[0])
    if axes is None or d is None or len(d) != 2 or src.dtype != ir.DataType.BOOL:
        return None
    axes = norm_axes(axes, 4)
    if axes == [1, 2] and same_dim(d[0], b_dim) and same_dim(d[1], s_dim):
        return {"kpm": src, "causal": 0, "kpm_pads": True}
    return negated_parts(src, b_dim, t_dim, s_dim) if axes == [0, 1] else None


def _square(value: ir.Value, t_dim, s_dim) -> bool:
    """``value`` ends in [T, S] with T = S (a causal mask's shape)."""
    d = dims(value)
    return d is not None and len(d) >= 2 and same_dim(d[-1], d[-2]) and same_dim(t_dim, s_dim)


def positions(value: ir.Value, axis: int) -> ir.Value | None:
    """value = Unsqueeze(Range(0, n, 1), [axis]) of a 2-D result -> the Range's limit."""
    node = producer(value, "Unsqueeze")
    if node is None or axes_of(node) is None or norm_axes(axes_of(node), 2) != [axis]:
        return None
    rng = producer(node.inputs[0], "Range")
    if rng is None or const_scalar(rng.inputs[0]) != 0 or const_scalar(rng.inputs[2]) != 1:
        return None
    return rng.inputs[1]


def where_mask(value: ir.Value, a_dims) -> tuple[ir.Value, dict] | None:
    """value = where(allowed, x, NEG) -> (x, parts of allowed); a bare x -> (x, {})."""
    node = producer(value, "Where")
    if node is None:
        return value, {}
    cond, x, y = node.inputs
    neg = const_scalar(y)
    if neg is None:
        negated = producer(cond, "Not")
        neg = const_scalar(x)
        if negated is None or neg is None:
            return None
        cond, x = negated.inputs[0], y
    if neg > -1e9:
        return None
    parts = allowed_parts(cond, a_dims[0], a_dims[2], a_dims[3])
    return None if parts is None else (x, parts)


def split_heads_source(value: ir.Value, perm: tuple) -> ir.Value | None:
    """value = Transpose(Reshape(src [B,X,D], [B,X,N,d]), perm) -> src."""
    t = producer(value, "Transpose")
    if t is None or perm_of(t) != perm:
        return None
    r = producer(t.inputs[0], "Reshape")
    if r is None:
        return None
    src, d4 = r.inputs[0], dims(t.inputs[0])
    d3 = dims(src)
    if (
        d3 is None
        or d4 is None
        or len(d3) != 3
        or len(d4) != 4
        or not isinstance(d4[2], int)
        or not isinstance(d4[3], int)
        or d3[2] != d4[2] * d4[3]
        or not same_dim(d3[0], d4[0])
        or not same_dim(d3[1], d4[1])
    ):
        return None
    return src


def merged_heads_target(o: ir.Value) -> ir.Value | None:
    """o [B,N,T,d] -> Transpose(0,2,1,3) -> Reshape [B,T,D]: the Reshape's output."""
    uses = list(o.uses())
    if not single_use(o) or uses[0].node.op_type != "Transpose" or perm_of(uses[0].node) != (0, 2, 1, 3):
        return None
    t = uses[0].node.outputs[0]
    uses = list(t.uses())
    if not single_use(t) or uses[0].node.op_type != "Reshape" or uses[0].idx != 0:
        return None
    out = uses[0].node.outputs[0]
    d, do = dims(out), dims(o)
    if d is None or do is None or len(d) != 3 or d[2] != do[1] * do[3]:
        return None
    return out


def parse_equation(node: ir.Node) -> tuple[list[str], str] | None:
    """An Einsum's equation as (input letter strings, output letters), '...' spelled out (see
    :func:`einsum_terms`); None where :func:`einsum_terms` refuses it."""
    try:
        return einsum_terms(node)
    except NoMatch:
        return None


def einsum_terms(node: ir.Node) -> tuple[list[str], str]:
    """An Einsum's equation as (input letter strings, output letters), an ellipsis spelled out as
    letters of its own, so a rule reads ``...qd,...kd->...qk`` as it reads ``bhqd,bhkd->bhqk``;
    raises NoMatch without an explicit output ('->') or where '...' cannot be spelled out."""
    eq = attr(node, "equation")
    if isinstance(eq, bytes):
        eq = eq.decode()
    if not isinstance(eq, str) or "->" not in eq:
        raise NoMatch(node, "an Einsum equation with an explicit output ('->')", repr(eq))
    lhs, out = eq.replace(" ", "").split("->")
    terms = lhs.split(",")
    return (terms, out) if "..." not in eq else _spell_out(node, terms, out)


def _spell_out(node: ir.Node, terms: list[str], out: str) -> tuple[list[str], str]:
    """Replace '...' by fresh letters (unused in the equation), one per ellipsis axis: an input has
    its rank minus its explicit letters of them, right-aligned across the inputs and in the output
    (numpy broadcasting), so an input with fewer leading axes lacks the leftmost letters. Refused
    (NoMatch) where the ranks are unknown, the output drops the ellipsis or a letter's dims are not
    known equal in every input that has it (a 1 broadcast against H is not the same product)."""
    counts = []
    for term, value in zip(terms, node.inputs):
        r, explicit = rank(value), len(term.replace("...", ""))
        if term.count("...") > 1 or ("..." in term and (r is None or r < explicit)):
            raise NoMatch(node, f"one '...' on an input of known rank >= {explicit}", f"'{term}' of rank {r}")
        counts.append(r - explicit if "..." in term else 0)
    n = max(counts, default=0)
    if len(terms) != len(node.inputs) or (n and "..." not in out):
        raise NoMatch(node, "one term per input and an output that keeps the '...' axes", f"{','.join(terms)}->{out}")
    fresh = "".join(c for c in string.ascii_letters if c not in "".join(terms) + out)[:n]
    spelled = [term.replace("...", fresh[n - c :]) for term, c in zip(terms, counts)]
    for letter in fresh:
        found = [dims(v)[t.index(letter)] for v, t in zip(node.inputs, spelled) if letter in t]
        if not all(same_dim(found[0], d) for d in found[1:]):
            raise NoMatch(
                node, "the '...' axes equal in every input (no broadcasting)", f"dims {found} on one '...' axis"
            )
    return spelled, out.replace("...", fresh)


def layout_chain(x: ir.Value) -> tuple[ir.Value, list[int | None]]:
    """Follow Transpose / Unsqueeze producers back to a source: x's axes as source axes (None for
    an inserted unit axis)."""
    ops = []
    cur = x
    while True:
        node = producer(cur, ("Transpose", "Unsqueeze"))
        if node is None or rank(node.inputs[0]) is None:
            break
        if node.op_type == "Transpose":
            p = perm_of(node)
            if p is None:
                break
            ops.append(("T", list(p)))
        else:
            axes = axes_of(node)
            if axes is None:
                break
            ops.append(("U", norm_axes(axes, rank(cur))))
        cur = node.inputs[0]
    layout: list[int | None] = list(range(rank(cur) or 0))
    for kind, arg in reversed(ops):
        if kind == "T":
            layout = [layout[p] for p in arg]
        else:
            for axis in arg:
                layout.insert(axis, None)
    return cur, layout


def transposed(b: Builder, x: ir.Value, perm: list[int]) -> ir.Value:
    """Transpose(x, perm), looking through the Transpose / Unsqueeze chain that made ``x`` so the
    result is at most one Transpose and one Unsqueeze of the chain's source."""
    if perm == list(range(len(perm))):
        return x
    if rank(x) != len(perm):  # unknown rank: no chain to look through
        return b.op("Transpose", [x], {"perm": perm}, dtype=x.dtype, shape=None)
    base, layout = layout_chain(x)
    out_layout = [layout[p] for p in perm]
    order = [i for i in out_layout if i is not None]
    units = [j for j, i in enumerate(out_layout) if i is None]
    if base is x or len(order) != rank(base):
        base, order, units = x, list(perm), []
    d = dims(base)
    y = base
    if order != list(range(len(order))):
        y = b.op(
            "Transpose", [base], {"perm": order}, dtype=base.dtype, shape=None if d is None else [d[p] for p in order]
        )
    if units:
        dy = dims(y)
        shape = None
        if dy is not None:
            shape, it = [], iter(dy)
            for j in range(len(out_layout)):
                shape.append(1 if j in units else next(it))
        y = b.op("Unsqueeze", [y, b.ints(units)], dtype=base.dtype, shape=shape)
    return y


QkMakers = tuple[Callable[[Builder], ir.Value], Callable[[Builder], ir.Value], float]


def qk_product(logits: ir.Value) -> QkMakers | None:
    """logits [B,N,T,S] = scale * q k^T (MatMul or Einsum) -> (q maker, k maker, scale); the makers
    emit q / k as [B,X,N,d]."""
    inner, scale = scaled(logits)
    node = producer(inner, ("MatMul", "Einsum"))
    if node is None or len(node.inputs) != 2:
        return None
    if node.op_type == "MatMul":
        q, qs = scaled(node.inputs[0])
        kt, ks = scaled(node.inputs[1])
        dq, dk = dims(q), dims(kt)
        if dq is None or dk is None or len(dq) != 4 or len(dk) != 4 or dq[1] != dk[1] or dq[3] != dk[2]:
            return None
        return (lambda b: transposed(b, q, [0, 2, 1, 3]), lambda b: transposed(b, kt, [0, 3, 1, 2]), scale * qs * ks)
    parsed = parse_equation(node)
    if parsed is None:
        return None
    (lq, lk), out = parsed
    if len(out) != 4 or len(lq) != 4 or len(lk) != 4:
        return None
    lb, ln, lt, ls = out
    ld = [c for c in lq if c not in out]
    if len(ld) != 1 or sorted(lq) != sorted([lb, ln, lt, ld[0]]) or sorted(lk) != sorted([lb, ln, ls, ld[0]]):
        return None
    q, k = node.inputs
    pq = [lq.index(c) for c in (lb, lt, ln, ld[0])]
    pk = [lk.index(c) for c in (lb, ls, ln, ld[0])]
    return (lambda b: transposed(b, q, pq), lambda b: transposed(b, k, pk), scale)


def all_true_mask(b: Builder, x: ir.Value, shape: tuple) -> ir.Value:
    """An all-true bool mask over x's first two axes (batch, tokens), of static ``shape``: what a
    fused op gets where the pattern had no padding mask (the same computation)."""
    size = b.op("Shape", [x], {"start": 0, "end": 2}, dtype=ir.DataType.INT64, shape=(2,))
    return b.op("Expand", [b.const(np.array(True), "true"), size], dtype=ir.DataType.BOOL, shape=shape)


def through_cast(value: ir.Value, upstream: bool) -> ir.Value:
    """Skip one single-use Cast before (``upstream``) or after a Softmax: an fp16 graph computes
    the masked softmax in fp32, as the contract says (Cast, Where, Softmax, Cast)."""
    if upstream:
        cast = producer(value, "Cast")
        return cast.inputs[0] if cast is not None and single_use(value) else value
    uses = list(value.uses())
    if single_use(value) and uses[0].node.op_type == "Cast" and uses[0].node.domain == "":
        return uses[0].node.outputs[0]
    return value


def permuted(items: tuple | list | None, perm: tuple) -> tuple | None:
    """``items`` (a value's dims) as Transpose(value, perm) has them; None stays None."""
    return None if items is None else tuple(items[p] for p in perm)


def inverse_perm(perm: tuple) -> tuple:
    """The permutation that undoes ``perm``."""
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


def einsum_qk(node: ir.Node, r: int) -> tuple[tuple, tuple]:
    """An Einsum q·k product of logits [batch.., T, S] (rank ``r``) -> (q's perm to [batch.., T, d],
    k's perm to k^T [batch.., d, S]); raises NoMatch. The logits' last two letters are the queries
    (only in q) and the keys (only in k); one letter is contracted (the head dim)."""
    parsed = einsum_terms(node)
    if len(parsed[0]) != 2:
        raise NoMatch(node, "a two-input Einsum", f"{len(parsed[0])} inputs")
    (lq, lk), out = parsed
    batch, t, s = out[:-2], out[-2:-1], out[-1:]
    contracted = [c for c in lq if c in lk and c not in out]
    if len(out) != r or len(contracted) != 1:
        raise NoMatch(node, f"logits of rank {r} over one contracted head dim", f"equation {lq},{lk}->{out}")
    d = contracted[0]
    if sorted(lq) != sorted(batch + t + d) or sorted(lk) != sorted(batch + s + d):
        raise NoMatch(node, "q [..,T,d] and k [..,S,d] sharing the batch / head letters", f"{lq},{lk}->{out}")
    return tuple(lq.index(c) for c in batch + t + d), tuple(lk.index(c) for c in batch + d + s)


def einsum_mix(node: ir.Node, probs_index: int, r: int) -> tuple[tuple, tuple]:
    """An Einsum mix of probabilities [batch.., T, S] with v -> (v's perm to [batch.., S, dv], the
    output's perm from [batch.., T, dv]: output = Transpose(canonical, perm)); raises NoMatch. The
    contracted letter must be the probabilities' last (key) axis: mixing over queries is not
    attention."""
    parsed = einsum_terms(node)
    if len(parsed[0]) != 2:
        raise NoMatch(node, "a two-input Einsum", f"{len(parsed[0])} inputs")
    inputs, out = parsed
    lp, lv = inputs[probs_index], inputs[1 - probs_index]
    if len(lp) != r or len(lv) != r or len(out) != r:
        raise NoMatch(node, f"probabilities, v and output of rank {r}", f"equation {','.join(inputs)}->{out}")
    batch, t, s = lp[:-2], lp[-2], lp[-1]
    extra = [c for c in lv if c not in lp]
    if s in out or s not in lv or t not in out or len(extra) != 1:
        raise NoMatch(node, "a mix over the probabilities' key axis (their last)", f"{','.join(inputs)}->{out}")
    dv = extra[0]
    if sorted(lv) != sorted(batch + s + dv) or sorted(out) != sorted(batch + t + dv):
        raise NoMatch(node, "v [..,S,dv] and output [..,T,dv] sharing the batch / head letters", f"{lv} -> {out}")
    canonical = batch + t + dv
    return tuple(lv.index(c) for c in batch + s + dv), tuple(canonical.index(c) for c in out)


def uniform_const(value: ir.Value | None) -> float | None:
    """The one value of a constant tensor whose elements are all equal (a constant, or an Expand /
    ConstantOfShape of one); None otherwise."""
    while (node := producer(value, ("Expand", "ConstantOfShape"))) is not None and node.op_type == "Expand":
        value = node.inputs[0]
    arr = const_array(value) if node is None else np.asarray(attr(node, "value").numpy())
    if arr is None or arr.size == 0 or arr.dtype == np.bool_ or not (arr == arr.reshape(-1)[0]).all():
        return None
    return float(arr.reshape(-1)[0])


def additive_causal(value: ir.Value, t_dim, s_dim, limit: float) -> bool:
    """Whether the float ``value`` [(1, 1,) T, S] (T = S) adds 0 on and below the diagonal and a fill
    <= ``limit`` above it: Llama's ``triu(full((T, T), finfo.min), 1)`` (Trilu upper, k = 1, of a
    uniform fill), or torch's float form of a boolean causal mask (``Where(strictly upper, fill, 0)``
    or ``Where(lower, 0, fill)``)."""
    while (node := producer(value, "Unsqueeze")) is not None and axes_of(node) is not None:
        if norm_axes(axes_of(node), rank(node.outputs[0]) or 0) != list(range(len(axes_of(node)))):
            return False
        value = node.inputs[0]
    d = dims(value)
    if d is None or len(d) != 2 or not same_dim(d[0], t_dim) or not same_dim(d[1], s_dim) or not same_dim(t_dim, s_dim):
        return False
    node = producer(value, ("Trilu", "Where"))
    if node is None:
        return False
    if node.op_type == "Trilu":
        fill = uniform_const(node.inputs[0])
        return _strictly_upper(node) and fill is not None and fill <= limit
    cond, a, b = node.inputs
    fa, fb = uniform_const(a), uniform_const(b)
    if fa is not None and fa <= limit and fb == 0:
        trilu = producer(cond, "Trilu")
        return trilu is not None and _strictly_upper(trilu) and is_all_true(trilu.inputs[0])
    return fa == 0 and fb is not None and fb <= limit and (allowed_parts(cond, None, t_dim, s_dim) or {}).get("causal")


def _strictly_upper(trilu: ir.Node) -> bool:
    k = const_scalar(trilu.inputs[1]) if len(trilu.inputs) > 1 and trilu.inputs[1] is not None else 0
    return attr(trilu, "upper", 1) == 1 and k == 1


def repeated_heads(x: ir.Value) -> tuple[ir.Value, int] | None:
    """x [B, H, S, d] = Reshape(Expand(Unsqueeze(src [B, Hkv, S, d], 2), [B, Hkv, H/Hkv, S, d])):
    grouped-query attention's repeat_kv (expand + reshape, and what ``repeat_interleave(n, dim=1)``
    exports) -> (src, Hkv). Head h of x is head h // (H/Hkv) of src."""
    r = producer(x, "Reshape")
    e = producer(r.inputs[0], "Expand") if r is not None else None
    u = producer(e.inputs[0], "Unsqueeze") if e is not None else None
    if u is None or axes_of(u) is None or norm_axes(axes_of(u), 5) != [2]:
        return None
    src, dx, de = u.inputs[0], dims(x), dims(e.outputs[0])
    ds = dims(src)
    if ds is None or dx is None or de is None or len(ds) != 4 or len(dx) != 4 or len(de) != 5:
        return None
    kv, rep = de[1], de[2]
    if not (isinstance(kv, int) and isinstance(rep, int) and dx[1] == kv * rep and ds[1] == kv):
        return None
    same = all(same_dim(a, b) for a, b in ((ds[0], dx[0]), (ds[2], dx[2]), (ds[3], dx[3])))
    return (src, kv) if same else None
