"""Small onnx-ir helpers shared by the graph passes: shapes, constants, node building."""

from __future__ import annotations

import re

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import onnx
import onnx_ir as ir

DOMAIN = "ai.attn2onnx"


def to_ir(model: onnx.ModelProto | ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(model) if isinstance(model, onnx.ModelProto) else model


def to_proto(model: onnx.ModelProto | ir.Model) -> onnx.ModelProto:
    return ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model


# -- shapes ---------------------------------------------------------------------------------------
def dims(value: ir.Value | None) -> tuple | None:
    """The value's dims (ints, or symbol names / None for unknown), None when the rank is unknown."""
    if value is None or value.shape is None:
        return None
    return tuple(d if isinstance(d, int) else d.value for d in value.shape.dims)


def rank(value: ir.Value | None) -> int | None:
    d = dims(value)
    return None if d is None else len(d)


_FACTOR = r"(?:[A-Za-z_][A-Za-z_0-9]*|[0-9]+)"
_SUM_OF_PRODUCTS = re.compile(rf"[+-]?{_FACTOR}(?:\*{_FACTOR})*(?:[+-]{_FACTOR}(?:\*{_FACTOR})*)*")


def canonical_dim(expr: str) -> str:
    """A symbolic dim written one way: spacing dropped, and a sum of products of names and
    integers with its terms and factors sorted (shape inference writes ``seq + past`` for one
    layer and ``past + seq`` for the next). Anything else (Min, parentheses) only loses its spaces.
    Plain string work: a dim is never evaluated (it comes from the model file)."""
    text = expr.replace(" ", "")
    if not _SUM_OF_PRODUCTS.fullmatch(text):
        return text
    terms = re.findall(r"([+-]?)([^+-]+)", text)
    return "".join(sorted(f"{sign or '+'}{'*'.join(sorted(term.split('*')))}" for sign, term in terms))


def same_dim(a: Any, b: Any) -> bool:
    """Two dims known to be equal: equal ints, or the same named symbol or symbolic expression
    (:func:`canonical_dim`: the exporter names a dim ``past+seq`` where shape inference writes
    ``past + seq`` or ``seq + past``)."""
    if a is None or b is None:
        return False
    if isinstance(a, str) and isinstance(b, str):
        return canonical_dim(a) == canonical_dim(b)
    return a == b


def dim_is(value: ir.Value, axis: int, expected: Any) -> bool:
    d = dims(value)
    return d is not None and -len(d) <= axis < len(d) and same_dim(d[axis], expected)


# -- constants ------------------------------------------------------------------------------------
def const_array(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    try:
        tensor = ir.convenience.get_const_tensor(value)
    except ValueError:
        return None
    return None if tensor is None else tensor.numpy()


def const_ints(value: ir.Value | None) -> list[int] | None:
    arr = const_array(value)
    if arr is None or arr.dtype.kind not in "iu":
        return None
    return [int(v) for v in arr.reshape(-1)]


def const_scalar(value: ir.Value | None) -> float | None:
    arr = const_array(value)
    if arr is None or arr.size != 1:
        return None
    return float(arr.reshape(-1)[0])


def attr(node: ir.Node, name: str, default: Any = None) -> Any:
    a = node.attributes.get(name)
    return default if a is None else a.value


def axes_of(node: ir.Node, input_index: int = 1, attr_name: str = "axes") -> list[int] | None:
    """Axes of Unsqueeze / Squeeze / Reduce*: from the attribute (old opsets) or the input."""
    a = attr(node, attr_name)
    if a is not None:
        return list(a)
    if len(node.inputs) > input_index and node.inputs[input_index] is not None:
        return const_ints(node.inputs[input_index])
    return None


def norm_axes(axes: Iterable[int], rank_: int) -> list[int]:
    return sorted(a % rank_ for a in axes)


def producer(value: ir.Value | None, op_type: str | Sequence[str] | None = None, domain: str = "") -> ir.Node | None:
    """The node producing ``value`` if it is one of ``op_type`` (standard domain by default)."""
    if value is None:
        return None
    node = value.producer()
    if node is None:
        return None
    if op_type is not None:
        types = (op_type,) if isinstance(op_type, str) else tuple(op_type)
        if node.op_type not in types or node.domain != domain:
            return None
    return node


def tree_leaves(value: ir.Value, op_type: str, interior: Callable[[ir.Value], bool]) -> list[ir.Value]:
    """The leaves, left to right, of the tree of standard ``op_type`` nodes (Add, And, ...) that
    produces ``value``: an input is walked into when such a node makes it and
    ``interior(input)`` holds. Iterative (an explicit stack), so a chain of thousands of nodes
    is no RecursionError."""
    leaves: list[ir.Value] = []
    stack = [(value, True)]
    while stack:
        item, root = stack.pop()
        node = producer(item, op_type)
        if node is None or (not root and not interior(item)):
            leaves.append(item)
        else:
            stack += [(x, False) for x in reversed(node.inputs)]  # the leftmost is popped first
    return leaves


def only_consumer(value: ir.Value, graph: ir.Graph) -> ir.Node | None:
    """The single node that uses ``value`` (once), None if several uses or a graph output."""
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0].node


# -- scopes ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scope:
    """A graph whose nodes the fusions rewrite: the main graph, the graph of one of the model's
    own functions, or a subgraph (If / Loop / Scan body) of either. ``top`` is the main graph or
    the function's graph: it holds the opset imports (a subgraph has none of its own) and the
    name space new values must stay unique in (a subgraph may not shadow an outer name)."""

    graph: ir.Graph
    top: ir.Graph
    main: bool  # the main graph or one of its subgraphs: constants become main-graph initializers


_SCOPE = "_a2o_scope"


def scopes(model: ir.Model) -> list[Scope]:
    """Every scope of ``model``: the main graph, then each function of the model's own (never the
    ``ai.attn2onnx`` op bodies: those are the ops' contract), each followed by its subgraphs."""
    tops = [model.graph] + [f.graph for key, f in model.functions.items() if key[0] != DOMAIN]
    return [Scope(g, top, top is model.graph) for top in tops for g in (top, *top.subgraphs())]


def scope_nodes(model: ir.Model) -> list[ir.Node]:
    """The nodes of every scope, listed before a fusion changes them (a fusion skips a listed node
    that an earlier one removed: its ``graph`` is None). Each scope is recorded on its graph, so a
    :class:`Builder` anchored there knows where it builds."""
    nodes: list[ir.Node] = []
    for scope in scopes(model):
        scope.graph.meta[_SCOPE] = scope
        nodes.extend(scope.graph)
    return nodes


def type_function_inputs(model: ir.Model) -> int:
    """Give each untyped input of the model's own functions the type and shape that every call
    passes (FunctionProto inputs are names only; onnx-ir does not read their value_info), so shape
    inference and the fusions see inside the body. A polymorphic function keeps what its calls
    disagree on. Returns how many inputs were typed."""
    calls: dict[ir.OperatorIdentifier, list[ir.Node]] = {}
    for scope in scopes(model):
        for node in scope.graph:
            calls.setdefault(node.op_identifier(), []).append(node)
    typed = 0
    for key, function in model.functions.items():
        if key[0] == DOMAIN or not calls.get(key):
            continue
        for index, value in enumerate(function.inputs):
            args = [c.inputs[index] if index < len(c.inputs) else None for c in calls[key]]
            if value.type is not None or any(a is None or a.type is None for a in args):
                continue
            if all(a.type == args[0].type and a.shape == args[0].shape for a in args):
                value.type, value.shape = args[0].type, None if args[0].shape is None else args[0].shape.copy()
                typed += 1
    return typed


def _scope_of(graph: ir.Graph) -> Scope:
    """The scope recorded by :func:`scope_nodes`; a graph never recorded is taken as a main graph."""
    scope = graph.meta.get(_SCOPE)
    return scope if scope is not None else Scope(graph, graph, True)


# -- building -------------------------------------------------------------------------------------
class Builder:
    """Creates nodes and inserts them, in order, before ``anchor`` in the anchor's own graph (main
    graph, function or subgraph), with names unique in its scope's name space."""

    def __init__(self, anchor: ir.Node, prefix: str = "a2o") -> None:
        self.graph, self.anchor, self.prefix = anchor.graph, anchor, prefix
        self.scope = _scope_of(anchor.graph)
        self.nodes: list[ir.Node] = []

    def op(
        self,
        op_type: str,
        inputs: Sequence[ir.Value | None],
        attributes: dict | None = None,
        *,
        domain: str = "",
        num_outputs: int = 1,
        dtype: ir.DataType | None = None,
        shape: Sequence[Any] | None = None,
    ) -> Any:
        """A new ``domain::op_type`` node before the anchor (its scope imports the domain); its output(s)."""
        attrs = ir.convenience.convert_attributes(attributes or {})
        node = ir.Node(
            domain, op_type, inputs, attributes=attrs, num_outputs=num_outputs, version=1 if domain == DOMAIN else None
        )
        if domain not in ("", "ai.onnx"):  # a function calling one must import the domain itself
            self.scope.top.opset_imports.setdefault(domain, 1)
        self.graph.insert_before(self.anchor, node)
        self.nodes.append(node)
        node.name = _names(self.scope.top).next(f"{self.prefix}_{op_type}")
        for out in node.outputs:
            out.name = node.name if num_outputs == 1 else f"{node.name}_{out.index()}"
        if dtype is not None:
            for out in node.outputs:
                out.dtype = dtype
        if shape is not None:
            node.outputs[0].shape = ir.Shape(list(shape))
        return node.outputs[0] if num_outputs == 1 else node.outputs

    def const(self, array: np.ndarray, name: str) -> ir.Value:
        """A constant holding ``array``: an initializer (unique name) of the main graph, which its
        subgraphs see too; in a function (no initializers there) a Constant node."""
        tensor = ir.tensor(np.asarray(array))
        if not self.scope.main:
            return self.op("Constant", [], {"value": tensor}, dtype=tensor.dtype, shape=tensor.shape)
        name = _names(self.scope.top).next(f"{self.prefix}_{name}")
        tensor.name = name
        value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
        self.scope.top.register_initializer(value)
        return value

    def ints(self, values: Sequence[int], name: str = "ints") -> ir.Value:
        return self.const(np.asarray(values, dtype=np.int64), name)


class _Names:
    """Unique names for the nodes and values a pass creates (never one the graph, or any of its
    subgraphs, already has)."""

    def __init__(self, graph: ir.Graph) -> None:
        self.used: set[str] = set(graph.initializers)
        for value in graph.inputs:
            self.used.add(value.name or "")
        for node in ir.traversal.RecursiveGraphIterator(graph):
            self.used.add(node.name or "")
            self.used.update(out.name or "" for out in node.outputs)
        self.count = 0

    def next(self, base: str) -> str:
        while True:
            self.count += 1
            name = f"{base}_{self.count}"
            if name not in self.used:
                self.used.add(name)
                return name


def expand_to_logits(b: Builder, mask: ir.Value, q: ir.Value, k: ir.Value) -> ir.Value:
    """A rank-4 mask [B|1, H|1, ., .] expanded to [B|1, H|1, T, S], with T and S read from axis 1 of
    the fused op's q and k [B, T|S, H*d]: MultiHeadAttention and Attention-23 check the T axis."""
    shape = b.op(
        "Concat",
        [
            b.op("Shape", [mask], {"start": 0, "end": 2}, dtype=ir.DataType.INT64, shape=(2,)),
            b.op("Shape", [q], {"start": 1, "end": 2}, dtype=ir.DataType.INT64, shape=(1,)),
            b.op("Shape", [k], {"start": 1, "end": 2}, dtype=ir.DataType.INT64, shape=(1,)),
        ],
        {"axis": 0},
        dtype=ir.DataType.INT64,
        shape=(4,),
    )
    return b.op("Expand", [mask, shape], dtype=mask.dtype, shape=None)


def _names(graph: ir.Graph) -> _Names:
    names = graph.meta.get("_a2o_names")
    if names is None:
        names = graph.meta["_a2o_names"] = _Names(graph)
    return names


def replace_value(old: ir.Value, new: ir.Value) -> None:
    """Point every user of ``old`` (graph outputs too, keeping the output's name) at ``new``."""
    if old.is_graph_output():
        name = old.name
        old.name = None
        new.name = name
    new.shape = new.shape or old.shape
    if new.type is None:
        new.type = old.type
    old.replace_all_uses_with(new, replace_graph_outputs=True)


def ensure_function(model: ir.Model, op_type: str) -> bool:
    """Attach the standard-op body of ``ai.attn2onnx::op_type`` if the model lacks it; make sure the
    model imports the domain. Returns False when the op (or its body) is not available."""
    model.opset_imports.setdefault(DOMAIN, 1)
    key = (DOMAIN, op_type, "")
    if key in model.functions:
        return True
    try:
        from attn2onnx.custom_ops import function_protos
    except ImportError:  # pragma: no cover - the package always ships custom_ops
        return False
    protos = function_protos()
    if op_type not in protos:
        return False
    func = ir.serde.deserialize_function(protos[op_type])
    model.functions[func.identifier()] = func
    for node in func:  # bodies may call other ops of the domain (DcmhaAttention -> DcmhaCompose)
        if node.domain == DOMAIN and not ensure_function(model, node.op_type):
            return False
    for domain, version in func.opset_imports.items():
        if domain == "":
            current = model.opset_imports.get("", version)
            model.opset_imports[""] = max(current, version)
        else:
            model.opset_imports.setdefault(domain, version)
    return True


def op_available(op_type: str) -> bool:
    try:
        from attn2onnx.custom_ops import REGISTRY
    except ImportError:  # pragma: no cover
        return False
    return op_type in REGISTRY


def count_ops(model: ir.Model) -> dict[str, int]:
    """Node counts by (domain-qualified) op type over every scope (main graph, the model's own
    functions, their subgraphs; not our ops' bodies)."""
    counts: dict[str, int] = {}
    for node in (n for scope in scopes(model) for n in scope.graph):
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def fuse_each(
    model: ir.Model, op_type: str, anchor: Callable[[ir.Node], bool], fuse: Callable[[ir.Model, ir.Node], bool]
) -> int:
    """Try ``fuse(model, node)`` at every node of every scope (:func:`scope_nodes`) where
    ``anchor(node)`` holds, when the ``op_type`` it would create is available; drop what the
    fusions left unused. Returns how many fused."""
    if not op_available(op_type):
        return 0
    count = sum(bool(fuse(model, node)) for node in scope_nodes(model) if node.graph is not None and anchor(node))
    if count:
        ir.passes.common.RemoveUnusedNodesPass()(model)
    return count


class FusionPass(ir.passes.InPlacePass):
    """A pass that makes one kind of ``ai.attn2onnx`` node (``op_type``) with :meth:`fuse`;
    ``counts`` after a run says how many, and the subclass's module logger says so (debug)."""

    op_type: str = ""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def fuse(self, model: ir.Model) -> int:  # pragma: no cover - every subclass overrides it
        """Make the nodes; how many were made."""
        raise NotImplementedError

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        made = self.fuse(model)
        self.counts = {self.op_type: made}
        if made:
            logging.getLogger(type(self).__module__).debug("%s: %d %s node(s)", type(self).__name__, made, self.op_type)
        return ir.passes.PassResult(model, bool(made))
