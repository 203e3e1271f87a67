"""Matching helpers shared by the attention passes (fuse_dcmha, fuse_misc, lower_attention,
fuse_standard_attention, explain): scales, masks, head layouts, and :class:`NoMatch`, the
reason a check failed (node, what was expected, what was found), in the style of onnxscript's
``MatchResult.fail``."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ._ir_utils import attr, axes_of, const_array, const_scalar, dims, norm_axes, producer, rank, same_dim


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
    arr = const_array(value)
    if arr is not None:
        return arr.dtype == np.bool_ and bool(arr.all())
    node = producer(value, ("Expand", "ConstantOfShape"))
    if node is None:
        return False
    if node.op_type == "Expand":
        return is_all_true(node.inputs[0])
    fill = attr(node, "value")
    return fill is not None and bool(np.asarray(fill.numpy()).all())


def allowed_parts(value: ir.Value, b_dim, t_dim, s_dim) -> dict | None:
    """Decompose a boolean 'allowed' tensor into key padding and causal parts."""
    node = value.producer()
    if node is None or node.domain != "":
        return None
    if node.op_type == "And":
        left = allowed_parts(node.inputs[0], b_dim, t_dim, s_dim)
        right = allowed_parts(node.inputs[1], b_dim, t_dim, s_dim)
        if left is None or right is None or (left.get("kpm") and right.get("kpm")):
            return None
        return {"kpm": left.get("kpm") or right.get("kpm"), "causal": left.get("causal", 0) or right.get("causal", 0)}
    if node.op_type == "Unsqueeze":
        axes = axes_of(node)
        src = node.inputs[0]
        d = dims(src)
        if axes is None or d is None:
            return None
        axes = norm_axes(axes, 4)
        if axes == [1, 2] and len(d) == 2 and same_dim(d[0], b_dim) and same_dim(d[1], s_dim):
            return {"kpm": src, "causal": 0}
        if axes == [0, 1] and len(d) == 2:
            return allowed_parts(src, b_dim, t_dim, s_dim)
        return None
    if node.op_type in ("LessOrEqual", "GreaterOrEqual"):
        keys, queries = node.inputs if node.op_type == "LessOrEqual" else node.inputs[::-1]
        if positions(keys, 0) is not None and positions(keys, 0) is positions(queries, 1) and same_dim(t_dim, s_dim):
            return {"kpm": None, "causal": 1}
        return None
    if node.op_type == "Trilu":
        k = const_scalar(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else 0
        d = dims(value)
        if attr(node, "upper", 1) == 0 and k == 0 and is_all_true(node.inputs[0]) and d is not None and \
                same_dim(d[-1], d[-2]) and same_dim(t_dim, s_dim):
            return {"kpm": None, "causal": 1}
    return None


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
    if d3 is None or d4 is None or len(d3) != 3 or len(d4) != 4 or not isinstance(d4[2], int) or \
            not isinstance(d4[3], int) or d3[2] != d4[2] * d4[3] or not same_dim(d3[0], d4[0]) or \
            not same_dim(d3[1], d4[1]):
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
