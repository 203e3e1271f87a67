"""The DCFormer release's forms of DCMHA, brought within reach of :mod:`.fuse_dcmha`.

Two things the release writes differently from the plain-PyTorch styles:

* its compose works on ``a.unsqueeze(1)`` (a group axis G = 1 at axis 1) and squeezes the sum
  back: ``Squeeze(a5 + Einsum('BGMTS,BTGM->BGTS' ...) ... , 1)``. :func:`drop_unit_group_axes`
  rewrites such a sum into the same sum on 4-D tensors (the unit letter dropped from every
  einsum, ``Unsqueeze(a, 1)`` back to ``a``), an exact rewrite that leaves plain einsum terms
  :mod:`.fuse_dcmha` recognises;
* its mask is a slice of a precomputed boolean buffer (a Constant in the graph: rows and keys
  taken from position 0 by Gather / GatherND of ``Range(0, n, 1)`` or by ``Slice(0, ...)``)
  filled with ``finfo(float16).min``. :func:`release_mask` proves such a mask causal, or causal
  with a window, from the constant itself: every leading block of a matrix whose entries are
  a function of ``row - col`` (allowed for 0 <= row - col <= W) has the same form, whatever the
  sequence length;
* where its mask arrives otherwise (``forward(x, freqs_cis, mask)`` called with a mask of the
  caller's: a graph input), or is any boolean tensor no rule proves causal / window / padding,
  :func:`input_mask` hands the tensor itself to DcmhaAttention's optional ``attn_mask`` input.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ._ir_utils import (
    Builder,
    attr,
    axes_of,
    const_array,
    const_scalar,
    dims,
    norm_axes,
    producer,
    same_dim,
    scope_nodes,
    tree_leaves,
)
from ._match import parse_equation, single_use

# The release's fill for masked logits (finfo(float16).min); anything at or below it leaves
# exp(fill - max) = 0 in fp32 for any logit row the model can produce, as NEG does.
FP16_MIN = -65504.0


# ---------------------------------------------------------------------------------------------
# the unit group axis
# ---------------------------------------------------------------------------------------------
def _without(d: tuple, axis: int) -> tuple:
    return d[:axis] + d[axis + 1 :]


def _drop_axis(b: Builder, value: ir.Value, axis: int) -> ir.Value:
    """``value`` without its unit ``axis``: the Unsqueeze source, an Einsum rebuilt without the
    axis' letter (its inputs with that letter in turn), or a Squeeze. The Einsums are planned
    with an explicit stack and built inputs first, so a chain of any length of them is no
    RecursionError."""
    planned: list[tuple[ir.Value, int, tuple | None]] = []
    stack = [(value, axis)]
    while stack:
        item, item_axis = stack.pop()
        plan = _einsum_plan(item, item_axis)
        planned.append((item, item_axis, plan))
        if plan is not None:
            stack += [(x, index) for x, _, index in plan[3] if index is not None]
    made: dict[tuple[int, int], ir.Value] = {}
    for item, item_axis, plan in reversed(planned):  # every input before the Einsum that takes it
        if (id(item), item_axis) not in made:
            made[(id(item), item_axis)] = _dropped(b, item, item_axis, plan, made)
    return made[(id(value), axis)]


def _einsum_plan(value: ir.Value, axis: int) -> tuple | None:
    """(node, letter, output term, [(input, term, index of the letter or None)]) when ``value``
    is an Einsum used once that can be rebuilt without output ``axis``; None otherwise."""
    node = value.producer()
    if node is None or node.domain != "" or node.op_type != "Einsum" or not single_use(value):
        return None
    parsed = parse_equation(node)
    if parsed is None or len(parsed[1]) <= axis:
        return None
    terms, out = parsed
    letter = out[axis]
    if out.count(letter) != 1:
        return None
    inputs = []
    for x, term in zip(node.inputs, terms):
        d = dims(x)
        if letter in term and (term.count(letter) != 1 or d is None or d[term.index(letter)] != 1):
            return None
        inputs.append((x, term, term.index(letter) if letter in term else None))
    return node, letter, out, inputs


def _dropped(b: Builder, value: ir.Value, axis: int, plan: tuple | None, made: dict) -> ir.Value:
    """One step of :func:`_drop_axis`, the inputs of a planned Einsum already in ``made``."""
    if plan is not None:
        node, letter, out, inputs = plan
        values = [x if index is None else made[(id(x), index)] for x, _, index in inputs]
        equation = ",".join(term.replace(letter, "") for _, term, _ in inputs) + "->" + out.replace(letter, "")
        result = node.outputs[0]
        return b.op("Einsum", values, {"equation": equation}, dtype=result.dtype, shape=_without(dims(result), axis))
    d = dims(value)
    node = producer(value, "Unsqueeze")
    if node is not None and (axes := axes_of(node)) is not None and norm_axes(axes, len(d)) == [axis]:
        return node.inputs[0]
    return b.op("Squeeze", [value, b.ints([axis])], dtype=value.dtype, shape=_without(d, axis))


def _grouped_sum(squeeze: ir.Node) -> list[ir.Value] | None:
    """The leaves of the Add tree a ``Squeeze(axis 1)`` takes, when they are a release compose
    on [B,1,N,T,S]: ``a`` unsqueezed at 1 among them and at least one einsum term."""
    x = squeeze.inputs[0]
    d = dims(x)
    axes = axes_of(squeeze)
    if d is None or len(d) != 5 or d[1] != 1 or axes is None or norm_axes(axes, 5) != [1]:
        return None
    leaves = tree_leaves(x, "Add", single_use)
    if len(leaves) < 2 or any(dims(leaf) is None or len(dims(leaf)) != 5 or dims(leaf)[1] != 1 for leaf in leaves):
        return None
    if not any(producer(leaf, "Unsqueeze") for leaf in leaves) or not any(producer(leaf, "Einsum") for leaf in leaves):
        return None
    return leaves


def drop_unit_group_axes(model: ir.Model) -> int:
    """Rewrite every release compose sum on [B,1,N,T,S] (then squeezed) as the same sum on
    [B,N,T,S]. Returns how many."""
    count = 0
    for node in scope_nodes(model):
        if node.op_type != "Squeeze" or node.domain != "" or node.graph is None:
            continue
        leaves = _grouped_sum(node)
        if leaves is None:
            continue
        b = Builder(node, "release")
        total = None
        for leaf in leaves:
            term = _drop_axis(b, leaf, 1)
            total = term if total is None else b.op("Add", [total, term], dtype=term.dtype, shape=dims(node.outputs[0]))
        out = node.outputs[0]
        total.shape = total.shape or out.shape
        if out.is_graph_output():
            continue
        out.replace_all_uses_with(total)
        count += 1
    if count:
        ir.passes.common.RemoveUnusedNodesPass()(model)
    return count


# ---------------------------------------------------------------------------------------------
# masks sliced from a constant
# ---------------------------------------------------------------------------------------------
@dataclass
class _View:
    """A value read out of a constant ``table``: per value axis, the table axis it walks from
    index 0 on (a prefix of it), or None for an inserted unit axis; ``lengths`` per table axis
    the prefix length (an int or a dim symbol of the graph; None when not known); ``fixed``
    table axes held at one index."""

    table: np.ndarray
    axes: list[int | None]
    lengths: dict[int, object] = field(default_factory=dict)
    fixed: dict[int, int] = field(default_factory=dict)

    def but(self, axes: list[int | None], **changes) -> "_View":
        return _View(
            self.table, axes, {**self.lengths, **changes.get("lengths", {})}, {**self.fixed, **changes.get("fixed", {})}
        )


def _length(value: ir.Value | None):
    """The graph dim a scalar (or 1-element) int value holds: Shape(x)[i] read as x's dim i,
    a constant as its int, through any number of Squeeze / Reshape / Cast / Unsqueeze; None otherwise."""
    ops = ("Squeeze", "Reshape", "Cast", "Unsqueeze", "Shape", "Gather")
    while (node := producer(value, ops)) is not None and node.op_type not in ("Shape", "Gather"):
        value = node.inputs[0]
    if node is None:
        c = const_scalar(value)
        return None if c is None else int(c)
    if node.op_type == "Shape":
        d = dims(node.inputs[0])
        start = attr(node, "start", 0)
        end = attr(node, "end", None)
        if d is None or (end if end is not None else len(d)) - start != 1:
            return None
        return d[start]
    shape, index = producer(node.inputs[0], "Shape"), const_scalar(node.inputs[1])  # a Gather
    if shape is None or index is None or attr(shape, "start", 0) != 0 or dims(shape.inputs[0]) is None:
        return None
    return dims(shape.inputs[0])[int(index)]


def _from_zero(index: ir.Value) -> ir.Value | None:
    """index = Range(0, n, 1) (possibly cast, possibly with a trailing unit axis) -> n."""
    while (node := producer(index, ("Cast", "Unsqueeze"))) is not None:
        if node.op_type == "Unsqueeze" and norm_axes(axes_of(node) or [0], 2) != [1]:
            return None
        index = node.inputs[0]
    rng = producer(index, "Range")
    ok = rng is not None and const_scalar(rng.inputs[0]) == 0 and const_scalar(rng.inputs[2]) == 1
    return rng.inputs[1] if ok else None


# The ops a view of a constant table goes through (:func:`_view_step`).
_VIEW_OPS = ("Cast", "Transpose", "Unsqueeze", "Squeeze", "Slice", "Gather", "GatherND")


def _view(value: ir.Value) -> _View | None:
    """``value`` as a view of a constant boolean table: the chain of view ops down to the table
    (walked in a loop, so any length), then each op applied to the table's view."""
    chain: list[ir.Node] = []
    while (node := value.producer()) is not None and node.op_type != "Constant":
        if node.domain != "" or node.op_type not in _VIEW_OPS or not node.inputs or node.inputs[0] is None:
            return None
        chain.append(node)
        value = node.inputs[0]
    table = const_array(value)
    if table is None or table.dtype != np.bool_:
        return None
    view: _View | None = _View(table, list(range(table.ndim)), dict(enumerate(table.shape)))
    for node in reversed(chain):
        view = _view_step(node, view)
        if view is None:
            return None
    return view


def _view_step(node: ir.Node, src: _View) -> _View | None:
    """The view ``node`` (one of _VIEW_OPS) makes of its first input's view ``src``."""
    op = node.op_type
    out_rank = len(dims(node.outputs[0]) or ())
    if op == "Cast":
        return src if attr(node, "to") == ir.DataType.BOOL else None
    if op == "Transpose":
        perm = attr(node, "perm")
        return None if perm is None else src.but([src.axes[p] for p in perm])
    if op == "Unsqueeze":
        axes = axes_of(node)
        if axes is None or not out_rank:
            return None
        out = list(src.axes)
        for axis in norm_axes(axes, out_rank):
            out.insert(axis, None)
        return src.but(out)
    if op == "Squeeze":
        axes = axes_of(node)
        if axes is None or any(src.axes[a] is not None for a in norm_axes(axes, len(src.axes))):
            return None
        return src.but([a for i, a in enumerate(src.axes) if i not in norm_axes(axes, len(src.axes))])
    if op == "Slice":
        return _sliced(node, src)
    if op == "Gather":
        return _gathered(node, src)
    if op == "GatherND":
        index = dims(node.inputs[1])
        ok = attr(node, "batch_dims", 0) == 0 and index is not None and len(index) == 2 and index[1] == 1
        limit = _from_zero(node.inputs[1])
        if not ok or src.axes[0] is None or limit is None:
            return None
        return src.but(src.axes, lengths={src.axes[0]: _length(limit)})
    return None


def _sliced(node: ir.Node, src: _View) -> _View | None:
    """Slice(x, 0, any end, axes, step 1) on table axes keeps them prefixes."""
    starts = const_array(node.inputs[1])
    axes = const_array(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
    steps = const_array(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else None
    if starts is None or np.any(starts != 0) or (steps is not None and np.any(steps != 1)):
        return None
    ends = node.inputs[2]
    axes = list(range(len(starts))) if axes is None else [a % len(src.axes) for a in axes.tolist()]
    if len(axes) != 1 or src.axes[axes[0]] is None:
        return None
    table_axis = src.axes[axes[0]]
    end = const_scalar(ends)
    if end is not None and end >= src.table.shape[table_axis]:
        return src
    return src.but(src.axes, lengths={table_axis: _length(ends)})


def _gathered(node: ir.Node, src: _View) -> _View | None:
    axis = attr(node, "axis", 0) % len(src.axes)
    table_axis = src.axes[axis]
    if table_axis is None:
        return None
    index = const_array(node.inputs[1])
    if index is not None and index.ndim == 0:
        return src.but(
            src.axes[:axis] + src.axes[axis + 1 :], fixed={table_axis: int(index) % src.table.shape[table_axis]}
        )
    limit = _from_zero(node.inputs[1])
    if limit is None or len(dims(node.inputs[1]) or ()) != 1:
        return None
    return src.but(src.axes, lengths={table_axis: _length(limit)})


def _band(view: _View) -> int | None:
    """0 for a causal table, W for causal with keys t - W..t, None for anything else: the
    table's [rows, keys] matrix must be allowed exactly where 0 <= row - key <= W."""
    rows, keys = view.axes[-2], view.axes[-1]
    if rows is None or keys is None or any(a is not None and view.table.shape[a] != 1 for a in view.axes[:-2]):
        return None
    index = [view.fixed.get(a, slice(None) if a in (rows, keys) else 0) for a in range(view.table.ndim)]
    if sum(isinstance(i, slice) for i in index) != 2:
        return None
    matrix = view.table[tuple(index)]
    if rows > keys:
        matrix = matrix.T
    distance = np.arange(matrix.shape[0])[:, None] - np.arange(matrix.shape[1])[None, :]
    if not matrix.any() or not np.all(matrix[distance == 0]):
        return None
    width = int(distance[matrix].max())
    if not np.array_equal(matrix, (distance >= 0) & (distance <= width)):
        return None
    return 0 if width >= matrix.shape[0] - 1 else width + 1


def release_mask(value: ir.Value) -> tuple[ir.Value, dict] | None:
    """value = where(allowed, x, fill <= finfo(float16).min) with ``allowed`` a causal / window
    slice of a constant -> (x, {"causal": 1, "window": W}) in DcmhaAttention's terms (W keys,
    0 for none)."""
    node = producer(value, "Where")
    if node is None:
        return None
    cond, x, fill = node.inputs
    if const_scalar(fill) is None or const_scalar(fill) > FP16_MIN:
        return None
    d, dx = dims(cond), dims(x)
    if d is None or dx is None or len(d) > 4 or len(dx) != 4 or not same_dim(dx[2], dx[3]):
        return None
    view = _view(cond)
    if view is None or view.axes[-2] is None or view.axes[-1] is None:
        return None
    rows, keys = view.lengths.get(view.axes[-2]), view.lengths.get(view.axes[-1])
    if not same_dim(rows, dx[2]) or not same_dim(keys, dx[3]):
        return None  # only the T x S leading block of the table is known to be read
    window = _band(view)
    return None if window is None else (x, {"causal": 1, "window": window, "kpm": None})


def _broadcasts_onto(mask: tuple, logits: tuple) -> bool:
    """Every axis of ``mask``, aligned to the right of ``logits`` [B,N,T,S], is 1 or the logits' dim
    (B and N proven; T and S, where both are dynamic, left to the op's run-time check)."""
    if not 1 <= len(mask) <= 4:
        return False
    aligned = list(zip(mask, logits[4 - len(mask) :]))
    heads_ok = all(size == 1 or same_dim(size, full) for size, full in aligned[: max(0, len(aligned) - 2)])
    # T and S: the op checks them at run time; a symbol the exporter derived (Min(seq, seq) of a
    # sliced mask) is accepted where the logits' dim is dynamic too
    rows_keys_ok = all(
        size == 1 or same_dim(size, full) or (isinstance(size, str) and isinstance(full, str))
        for size, full in aligned[-2:]
    )
    return heads_ok and rows_keys_ok


def input_mask(value: ir.Value) -> tuple[ir.Value, dict] | None:
    """value = where(allowed, x, fill <= finfo(float16).min), or where(Not(allowed), fill, x),
    with ``allowed`` any bool tensor that broadcasts onto the logits x [B,N,T,S] -> (x,
    {"attn_mask": allowed}): DcmhaAttention's optional input, which the op ANDs with its own
    masks (none here), so the fused node computes exactly what the Where does. Tried after the
    rules that prove a mask causal / window / padding, for what they leave."""
    node = producer(value, "Where")
    if node is None:
        return None
    cond, x, fill = node.inputs
    negated = producer(cond, "Not")
    if const_scalar(fill) is None and negated is not None:  # masked_fill(~allowed, fill)
        cond, x, fill = negated.inputs[0], fill, x
    if const_scalar(fill) is None or const_scalar(fill) > FP16_MIN or cond.dtype != ir.DataType.BOOL:
        return None
    d, dx = dims(cond), dims(x)
    if d is None or dx is None or len(dx) != 4 or not _broadcasts_onto(d, dx):
        return None
    return x, {"attn_mask": cond}


def align_mask_shapes(model: ir.Model) -> int:
    """Where a release mask is proven to be the logits' T x S block, or is a mask for the op's
    ``attn_mask`` (whose broadcast the op checks at run time), the masked logits (and their softmax)
    have the logits' shape: say so, where the exporter recorded another symbol (``Min(max_len, seq)``
    for the key axis of a sliced buffer or of ``mask[..., :S]``). Returns how many."""
    count = 0
    for node in scope_nodes(model):
        if node.op_type != "Where" or node.domain != "":
            continue
        found = release_mask(node.outputs[0]) or input_mask(node.outputs[0])
        if found is None or found[0].shape is None:
            continue
        shape = found[0].shape  # the masked logits (a Where's second or third input)
        out = node.outputs[0]
        if out.shape != shape:
            out.shape = shape
            count += 1
        # Down to the Softmax, through additive masks (HF adds a padding bias after the Where):
        # every value on the way has the logits' shape too.
        value = out
        while (
            len(uses := list(value.uses())) == 1
            and uses[0].node.domain == ""
            and uses[0].node.op_type in ("Add", "Softmax")
        ):
            value = uses[0].node.outputs[0]
            value.shape = shape
    return count


def prepare_release_forms(model: ir.Model) -> int:
    """Both rewrites :mod:`.fuse_dcmha` needs before it looks for composes: compose sums on the
    unit group axis made 4-D, release masks' shapes aligned with the logits. Returns how many."""
    return align_mask_shapes(model) + drop_unit_group_axes(model)
