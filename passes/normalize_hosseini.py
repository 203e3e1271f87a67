"""Per-head attention loops, as Hosseini & Hosseini's public code writes them, -> one head-batched core.

The reference implementation of optimised / efficient / super attention
(NMesaC/pay-better-attention-pytorch-keras, ``pytorch_implementation/``; written out in
tests/corpus_hosseini/published_style.py) runs one module per head and concatenates the heads'
outputs as it goes. A stock export of it is, per head h (columns ``[h d, (h+1) d)``):

    q_h = x W_q,h + b_q,h            (a per-head projection, or a column slice of a wider tensor)
    k_h = x W_k,h + b_k,h | x[:, :, cols]          v_h = x[:, :, cols] | mix(x[:, :, cols])
    o_h = Softmax(scale * q_h @ Transpose(k_h), axis) @ v_h       [B,T,T] logits, no mask
    y   = Concat(..Concat(Concat(o_0, o_1), o_2).., axis=-1)

with ``mix(v) = Transpose(Transpose(v) @ Wt + b)``: an ``nn.Linear(max_len, max_len)`` over the
token axis, U = Wt^T v + b[:, None], which needs T = max_len (a static export; batch stays dynamic).

One rule, pattern -> check -> rewrite, every check raising :class:`~._match.NoMatch`:

* pattern: a Concat tree over the last axis whose leaves are per-head cores;
* check: every head has the same softmax axis and scale, its q / k / v take the same
  sources' consecutive column blocks in Concat order (slices tiling the source, or per-head
  projections of one input), the same value mix (shared W_a) or one per head;
* rewrite: the canonical head-batched core on [B,T,N*d] tensors (per-head projections packed into
  one MatMul, slices replaced by their source), ``Reshape -> Transpose`` head split,
  ``MatMul, Mul(scale), Softmax, MatMul``, ``Transpose -> Reshape`` merge. The value mix becomes
  the canonical super mix ``MatMul(W_a, x) + b[:, None]`` (one for a shared W_a, one per head and a
  Concat otherwise), which :mod:`.fuse_super_mix` turns into SuperMix.

The softmax axis is kept as the code has it. A softmax over keys then lowers onto fused attention
(:mod:`.lower_attention`, projections packed). A softmax over *queries* (the published
``nn.Softmax(dim=1)`` on [B,T,T] scores) is what the published code computes, so it stays one:
``Softmax(axis=-2)`` on the batched logits, which no fused kernel computes (``optimize --explain``
says so); it is never rewritten into a softmax over keys. The batched Softmax lists the per-head
cores it replaced (:func:`merged_cores`) so that ``--explain`` reports each of them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ._ir_utils import Builder, attr, const_array, const_ints, dims, producer, rank, replace_value, scope_nodes
from ._match import NoMatch, found_op, perm_of, scaled, single_use

logger = logging.getLogger(__name__)

MERGED = "attn2onnx.merged_cores"  # Node.meta key: names of the per-head Softmax nodes a batched one replaced


def merged_cores(node: ir.Node) -> list[str]:
    """Names of the per-head Softmax nodes that ``node`` (a batched Softmax of this pass) replaced."""
    return list(node.meta.get(MERGED, ()))


# ---------------------------------------------------------------------------------------------
# pattern + check
# ---------------------------------------------------------------------------------------------
@dataclass
class Columns:
    """One head's block of columns of a [B,X,W] source: a Slice of ``src`` (``lo``..``lo+width``),
    or a projection ``src @ weight (+ bias)`` (``weight`` [Din, width])."""

    value: ir.Value
    src: ir.Value
    width: int
    lo: int | None = None
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None


@dataclass
class Head:
    """One per-head core ``Softmax(scale * q k^T, axis) @ v``; ``mix`` = (W_a [L,L], b [L] | None)
    when v is a token mix of ``v``'s columns."""

    soft: ir.Node
    q: Columns
    k: Columns
    v: Columns
    scale: float
    over_queries: bool
    mix: tuple[np.ndarray, np.ndarray | None] | None = None


def _columns(value: ir.Value) -> Columns:
    """A column Slice over the last axis, or ``MatMul(src, W const) [+ b const]``; raises NoMatch."""
    sl = producer(value, "Slice")
    if sl is not None:
        return _sliced(value, sl)
    add = producer(value, "Add")
    mm = producer(value, "MatMul")
    bias = None
    if add is not None:
        for i in (0, 1):
            b = const_array(add.inputs[1 - i])
            if (node := producer(add.inputs[i], "MatMul")) is not None and b is not None and b.ndim == 1:
                mm, bias = node, b
    w = const_array(mm.inputs[1]) if mm is not None else None
    if w is None or w.ndim != 2 or rank(mm.inputs[0]) != 3 or (bias is not None and bias.shape[0] != w.shape[1]):
        raise NoMatch(value, "a head's columns: a Slice of the last axis or a projection x @ W (+ b)", found_op(value))
    return Columns(value, mm.inputs[0], int(w.shape[1]), weight=w, bias=bias)


def _sliced(value: ir.Value, sl: ir.Node) -> Columns:
    """Slice(src [B,X,W], [lo], [hi], axes [-1 | 2], steps [1]) -> its Columns; raises NoMatch."""
    src, d = sl.inputs[0], dims(sl.inputs[0])
    starts, ends = const_ints(sl.inputs[1]), const_ints(sl.inputs[2])
    axes = const_ints(sl.inputs[3]) if len(sl.inputs) > 3 and sl.inputs[3] is not None else [0]
    steps = const_ints(sl.inputs[4]) if len(sl.inputs) > 4 and sl.inputs[4] is not None else [1]
    if d is None or len(d) != 3 or not isinstance(d[2], int) or starts is None or ends is None:
        raise NoMatch(sl, "a constant Slice of a [B,X,W] tensor", f"shape {d}, starts {starts}, ends {ends}")
    if axes is None or len(axes) != 1 or axes[0] % 3 != 2 or steps != [1]:
        raise NoMatch(sl, "one Slice over the last axis with step 1", f"axes {axes}, steps {steps}")
    lo, hi = (min(max(i if i >= 0 else i + d[2], 0), d[2]) for i in (starts[0], ends[0]))
    if hi <= lo:
        raise NoMatch(sl, "a non-empty column block", f"columns {lo}:{hi}")
    return Columns(value, src, hi - lo, lo=lo)


def _value_mix(value: ir.Value) -> tuple[Columns, tuple[np.ndarray, np.ndarray | None] | None]:
    """v = Transpose(Transpose(cols) @ Wt [+ b]) (an nn.Linear over tokens) -> (cols, (Wt^T, b));
    any other v -> (its Columns, None). Raises NoMatch."""
    back = producer(value, "Transpose")
    if back is None:
        return _columns(value), None
    if perm_of(back) != (0, 2, 1):
        raise NoMatch(back, "a token mix transposed back with perm (0, 2, 1)", f"perm {perm_of(back)}")
    lin = _columns(back.inputs[0])  # Transpose(cols) @ Wt (+ b): a projection of the transposed values
    there = producer(lin.src, "Transpose")
    if lin.weight is None or there is None or perm_of(there) != (0, 2, 1):
        raise NoMatch(back, "a token mix Transpose(Transpose(v) @ W_a^T + b)", found_op(lin.src))
    cols, t = _columns(there.inputs[0]), (dims(there.inputs[0]) or (None, None))[1]
    if not isinstance(t, int) or lin.weight.shape != (t, t):
        raise NoMatch(back, f"W_a [T, T] over the token axis (T = {t}, static)", f"W_a {lin.weight.shape}")
    return cols, (lin.weight.T, lin.bias)


def match_head(out: ir.Value) -> Head:
    """pattern + check of one per-head core ending at ``out``; raises NoMatch."""
    pv = producer(out, "MatMul")
    soft = producer(pv.inputs[0], "Softmax") if pv is not None else None
    if soft is None or not single_use(out) or not single_use(soft.outputs[0]):
        raise NoMatch(out, "a head output Softmax(..) @ v used once, by the Concat", found_op(out))
    r, axis = rank(soft.outputs[0]), attr(soft, "axis", -1)
    if r != 3 or axis % 3 not in (1, 2):
        raise NoMatch(soft, "a Softmax over the keys or the queries of [B,T,S] logits", f"axis {axis} of rank {r}")
    logits = soft.inputs[0]
    inner, scale = scaled(logits)
    qk = producer(inner, "MatMul")
    if qk is None or not single_use(logits):
        raise NoMatch(soft, "logits = scale * MatMul(q, k^T), no mask (the published form)", found_op(inner))
    (q, qs), (kt, ks) = scaled(qk.inputs[0]), scaled(qk.inputs[1])
    tk = producer(kt, "Transpose")
    if tk is None or perm_of(tk) != (0, 2, 1):
        raise NoMatch(qk, "k^T = Transpose(k, perm (0, 2, 1))", found_op(kt))
    v, mix = _value_mix(pv.inputs[1])
    return Head(soft, _columns(q), _columns(tk.inputs[0]), v, scale * qs * ks, axis % 3 == 1, mix)


def concat_leaves(root: ir.Node) -> list[ir.Value]:
    """The inputs of a tree of Concats over the last axis (inner Concats used once), in order
    (walked with an explicit stack, so any depth)."""
    leaves = []
    stack = list(reversed(root.inputs))
    while stack:
        value = stack.pop()
        inner = producer(value, "Concat")
        if inner is not None and single_use(value) and _last_axis(inner):
            stack += reversed(inner.inputs)
        else:
            leaves.append(value)
    return leaves


def _last_axis(concat: ir.Node) -> bool:
    r = rank(concat.outputs[0])
    return r == 3 and attr(concat, "axis", 0) % 3 == 2


def _mix_form(head: Head) -> tuple[bool, bool]:
    """(values mixed over tokens, the mix has a bias)."""
    return head.mix is not None, head.mix is not None and head.mix[1] is not None


def _check_blocks(role: str, blocks: list[Columns]) -> None:
    """Every head's block comes from one source, the h-th of equal widths; slices tile the source."""
    first, anchor = blocks[0], blocks[0].value
    if any(c.src is not first.src or c.width != first.width for c in blocks):
        raise NoMatch(anchor, f"every head's {role} from one source, in blocks of one width", "different sources")
    if any((c.weight is None) != (first.weight is None) or (c.bias is None) != (first.bias is None) for c in blocks):
        raise NoMatch(anchor, f"every head's {role} of one form (slices or projections)", "mixed forms")
    if first.weight is None:
        found = [c.lo for c in blocks]
        width = dims(first.src)[2]
        if found != [h * first.width for h in range(len(blocks))] or len(blocks) * first.width != width:
            raise NoMatch(anchor, f"{role} slices tiling the source's {width} columns in head order", f"starts {found}")


def match(root: ir.Node) -> list[Head]:
    """pattern + check of a per-head loop ending in the Concat tree ``root``; raises NoMatch."""
    if root.op_type != "Concat" or not _last_axis(root):
        raise NoMatch(root, "a Concat over the last axis of [B,T,D] head outputs", f"axis {attr(root, 'axis')}")
    heads = [match_head(v) for v in concat_leaves(root)]
    first = heads[0]
    if any(h.over_queries != first.over_queries or h.scale != first.scale for h in heads):
        raise NoMatch(root, "one softmax axis and one scale for every head", "heads that differ")
    if any(_mix_form(h) != _mix_form(first) for h in heads):
        raise NoMatch(root, "a token mix (with or without bias) on every head's values or on none", "heads that differ")
    for role in ("q", "k", "v"):
        _check_blocks(role, [getattr(h, role) for h in heads])
    if first.q.width != first.k.width:
        raise NoMatch(root, "q and k heads of one width", f"{first.q.width} and {first.k.width}")
    return heads


# ---------------------------------------------------------------------------------------------
# rewrite
# ---------------------------------------------------------------------------------------------
def _batched(b: Builder, blocks: list[Columns]) -> ir.Value:
    """The [B,X,N*w] tensor whose h-th column block is head h's: the sliced source itself, or one
    projection with the heads' weights side by side."""
    first = blocks[0]
    if first.weight is None:
        return first.src
    x, dtype = first.src, first.src.dtype
    shape = (*dims(x)[:2], first.width * len(blocks))
    y = b.op("MatMul", [x, b.const(np.concatenate([c.weight for c in blocks], 1), "weight")], dtype=dtype, shape=shape)
    if first.bias is not None:
        y = b.op("Add", [y, b.const(np.concatenate([c.bias for c in blocks]), "bias")], dtype=dtype, shape=shape)
    return y


def _mixed(b: Builder, heads: list[Head], v3: ir.Value) -> ir.Value:
    """The canonical super mix of the batched values: ``W_a @ v + b[:, None]``, one MatMul for a
    W_a shared by every head, else one per head's columns and a Concat."""
    dtype, shape = v3.dtype, dims(v3)
    (wa, bias), rest = heads[0].mix, [h.mix for h in heads[1:]]
    if all(_same(m, wa) and _same(c, bias) for m, c in rest):
        u = b.op("MatMul", [b.const(wa, "wa"), v3], dtype=dtype, shape=shape)
        return u if bias is None else b.op("Add", [u, b.const(bias[:, None], "wa_bias")], dtype=dtype, shape=shape)
    mixes = [b.op("MatMul", [b.const(h.mix[0], "wa"), h.v.value], dtype=dtype, shape=dims(h.v.value)) for h in heads]
    u = b.op("Concat", mixes, {"axis": -1}, dtype=dtype, shape=shape)
    if bias is None:
        return u
    per_column = np.concatenate([np.repeat(h.mix[1][:, None], h.v.width, 1) for h in heads], 1)  # [T, N*dv]
    return b.op("Add", [u, b.const(per_column, "wa_bias")], dtype=dtype, shape=shape)


def _same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    """Two optional constants with equal values (both absent counts as equal)."""
    return (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))


def _split(b: Builder, x3: ir.Value, heads: int, width: int, perm: tuple) -> ir.Value:
    """[B,X,N*w] -> Reshape [B,X,N,w] -> Transpose(perm)."""
    d = dims(x3)
    x4 = b.op("Reshape", [x3, b.ints([0, 0, heads, width])], dtype=x3.dtype, shape=(d[0], d[1], heads, width))
    return b.op("Transpose", [x4], {"perm": list(perm)}, dtype=x3.dtype, shape=tuple(dims(x4)[p] for p in perm))


def rewrite(root: ir.Node, heads: list[Head]) -> ir.Node:
    """Replace the loop by the batched core; returns its Softmax."""
    b = Builder(root, "hosseini")
    n, first = len(heads), heads[0]
    q3, k3 = _batched(b, [h.q for h in heads]), _batched(b, [h.k for h in heads])
    v3 = _batched(b, [h.v for h in heads])
    if first.mix is not None:
        v3 = _mixed(b, heads, v3)
    dq, dk, dtype = dims(q3), dims(k3), q3.dtype
    q4 = _split(b, q3, n, first.q.width, (0, 2, 1, 3))
    kt4 = _split(b, k3, n, first.k.width, (0, 2, 3, 1))
    v4 = _split(b, v3, n, first.v.width, (0, 2, 1, 3))
    logits_shape = (dq[0], n, dq[1], dk[1])
    logits = b.op("MatMul", [q4, kt4], dtype=dtype, shape=logits_shape)
    scale = b.const(np.array(first.scale, dtype=dtype.numpy()), "scale")
    logits = b.op("Mul", [logits, scale], dtype=dtype, shape=logits_shape)
    probs = b.op("Softmax", [logits], {"axis": -2 if first.over_queries else -1}, dtype=dtype, shape=logits_shape)
    soft = probs.producer()
    soft.meta[MERGED] = [h.soft.name for h in heads]
    o4 = b.op("MatMul", [probs, v4], dtype=dtype, shape=(dq[0], n, dq[1], first.v.width))
    o = b.op("Transpose", [o4], {"perm": [0, 2, 1, 3]}, dtype=dtype, shape=(dq[0], dq[1], n, first.v.width))
    replace_value(root.outputs[0], b.op("Reshape", [o, b.ints([0, 0, n * first.v.width])], dtype=dtype, shape=None))
    return soft


def normalize_hosseini(model: ir.Model) -> tuple[int, int]:
    """Batch every per-head loop (main graph, functions, subgraphs); returns (cores over keys,
    cores over queries)."""
    found = [0, 0]
    for node in scope_nodes(model):
        if node.graph is None or node.domain != "" or node.op_type != "Concat":
            continue
        uses = list(node.outputs[0].uses())
        if len(uses) == 1 and uses[0].node.op_type == "Concat" and _last_axis(uses[0].node):
            continue  # an inner Concat of a tree: its root is the anchor
        try:
            heads = match(node)
        except NoMatch as why:
            logger.debug("head loop not batched: %s", why)
            continue
        soft = rewrite(node, heads)
        found[heads[0].over_queries] += 1
        logger.debug(
            "%d heads batched into %r (softmax over %s)",
            len(heads),
            soft.name,
            "queries" if heads[0].over_queries else "keys",
        )
    if any(found):
        ir.passes.common.RemoveUnusedNodesPass()(model)
    return found[0], found[1]


class NormalizeHosseiniPass(ir.passes.InPlacePass):
    """Per-head loops -> head-batched cores (the published optimised / efficient / super code)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        keys, queries = normalize_hosseini(model)
        self.counts = {
            "batched head loop (softmax over keys)": keys,
            "batched head loop (softmax over queries)": queries,
        }
        return ir.passes.PassResult(model, bool(keys or queries))
