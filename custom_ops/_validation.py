"""Check every ``ai.attn2onnx`` node of a model against its op's schema and rules before the
model is optimised or run.

ONNX Runtime, the function bodies and the graph passes all trust the node: a negative window,
a rank-2 query, a missing ``factors`` or ``eps = -1`` either crash deep inside ORT with a
traceback or run and give garbage (non-finite outputs, a default silently filled in). One
generic checker reads what each op declares next to its schema (:class:`~._common.OpRules`:
attribute rules, input dims as labels, cross rules) and raises :class:`InvalidModelError`, a
UsageError, naming the node, the attribute or input, what was expected and what was found.

Walked: the main graph and its subgraphs (with the ranks and static dims that ONNX shape
inference knows) and the model's functions (attribute references there are taken on trust:
their values arrive with the calling node, which is checked itself).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import onnx

from attn2onnx.errors import UsageError
from ._common import DOMAIN, OPSET_VERSION, REGISTRY, TRT_RULES, AttrRule, OpDef, OpRules

# A known shape: one entry per axis, an int where the size is static, None where it is not.
Shape = tuple[int | None, ...]
FLOAT_KINDS = (onnx.AttributeProto.FLOAT, onnx.AttributeProto.FLOATS)
LIST_KINDS = (onnx.AttributeProto.INTS, onnx.AttributeProto.FLOATS)


class InvalidModelError(UsageError):
    """An ``ai.attn2onnx`` node that breaks its op's contract (schema, attribute ranges, input ranks
    and sizes): rejected before anything optimises or runs it."""


@dataclass(frozen=True)
class ValueInfo:
    """What the checker knows of one tensor: element type (0: unknown) and shape (None: unknown)."""

    elem_type: int = 0
    shape: Shape | None = None


@dataclass(frozen=True)
class Site:
    """The nodes of one scope: their domain version and the tensors known there."""

    where: str  # "" for the main graph, else " in function ..."
    nodes: Sequence[onnx.NodeProto]
    version: int | None  # the scope's ai.attn2onnx opset version (None: not imported)
    values: Mapping[str, ValueInfo]


def check_model(model: Any) -> None:
    """Raise :class:`InvalidModelError` for the first broken ``ai.attn2onnx`` node (the message
    counts any further problems); return quietly when every node is valid. ``model``: a
    ModelProto, an ``onnx_ir.Model``, serialized bytes or a path (read without its external
    weights, which no check needs)."""
    proto = _as_proto(model)
    problems = [
        p
        for site in _sites(proto)
        for node_index, node in enumerate(site.nodes)
        if node.domain == DOMAIN
        for p in _node_problems(node, node_index, site)
    ]
    if problems:
        more = f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
        raise InvalidModelError(f"invalid model: {problems[0]}{more}")


def _as_proto(model: Any) -> onnx.ModelProto:
    """The model as a ModelProto (external weights stay external: shapes and attributes suffice)."""
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, bytes):
        return onnx.load_from_string(model)
    if isinstance(model, (str, os.PathLike)):
        from attn2onnx.onnx_io import load_onnx

        return load_onnx(model)
    import onnx_ir as ir

    if isinstance(model, ir.Model):
        return ir.serde.serialize_model(model)
    raise TypeError(f"expected a model path, bytes, onnx.ModelProto or onnx_ir.Model, got {type(model).__name__}")


# ------------------------------------------------------------------ walking the model
def _sites(model: onnx.ModelProto) -> Iterator[Site]:
    """The main graph with its subgraphs (shapes from shape inference), then every function."""
    version = _domain_version(model.opset_import)
    values = _known_values(model)
    for graph in _graphs(model.graph):
        yield Site("" if graph is model.graph else f" in subgraph {graph.name!r}", graph.node, version, values)
    for function in model.functions:
        nodes = [n for g in _function_scopes(function) for n in g]
        yield Site(
            f" in function {function.domain}::{function.name}", nodes, _domain_version(function.opset_import), {}
        )


def _domain_version(opset_import: Sequence[onnx.OperatorSetIdProto]) -> int | None:
    return next((o.version for o in opset_import if o.domain == DOMAIN), None)


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and, depth first, every subgraph held by its nodes' attributes (If/Loop/Scan)."""
    yield graph
    for node in graph.node:
        yield from _subgraphs(node)


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """Every graph held by ``node``'s attributes, each with its own subgraphs."""
    for attr in node.attribute:
        for sub in (
            [attr.g]
            if attr.type == onnx.AttributeProto.GRAPH
            else attr.graphs
            if attr.type == onnx.AttributeProto.GRAPHS
            else []
        ):
            yield from _graphs(sub)


def _function_scopes(function: onnx.FunctionProto) -> Iterator[Sequence[onnx.NodeProto]]:
    """The function's own nodes, then those of the subgraphs they hold."""
    yield function.node
    for node in function.node:
        for sub in _subgraphs(node):
            yield sub.node


def _known_values(model: onnx.ModelProto) -> dict[str, ValueInfo]:
    """Element type and shape of every tensor ONNX shape inference can tell (the declared
    value_info when inference fails on a broken or oversized model)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001 - inference fails in many ways on the models we reject
        inferred = model
    values: dict[str, ValueInfo] = {}
    for graph in _graphs(inferred.graph):
        for init in graph.initializer:
            values[init.name] = ValueInfo(init.data_type, tuple(init.dims))
        for info in (*graph.input, *graph.value_info, *graph.output):
            values.setdefault(info.name, _value_info(info))
    return values


def _value_info(info: onnx.ValueInfoProto) -> ValueInfo:
    tensor = info.type.tensor_type
    if not info.type.HasField("tensor_type"):
        return ValueInfo()
    shape = None
    if tensor.HasField("shape"):
        shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
    return ValueInfo(tensor.elem_type, shape)


# ------------------------------------------------------------------ one node
def _node_problems(node: onnx.NodeProto, index: int, site: Site) -> list[str]:
    """Every broken rule of one ai.attn2onnx node, each as '<node>: <problem>'."""
    label = f"{node.op_type} node {node.name!r}" if node.name else f"{node.op_type} node #{index} (unnamed)"
    label += site.where
    opdef = REGISTRY.get(node.op_type)
    if opdef is None:
        return [f"{label}: unknown op {DOMAIN}::{node.op_type}; this op set has {', '.join(sorted(REGISTRY))}"]
    if site.version != OPSET_VERSION:
        found = "no import of the domain" if site.version is None else f"version {site.version}"
        return [f"{label}: needs opset {DOMAIN} version {OPSET_VERSION}, found {found}"]
    problems = _arity_problems(node, opdef.schema)
    rules = opdef.rules or OpRules(attributes=(), inputs={})
    attrs, attr_problems = _attribute_values(node, opdef, rules)
    problems += attr_problems
    if not problems:
        dims, dim_problems = _input_problems(node, opdef.schema, rules, site.values)
        problems += dim_problems + _rule_problems(rules, attrs, dims)
    return [f"{label}: {p}" for p in problems]


def _arity_problems(node: onnx.NodeProto, schema: onnx.defs.OpSchema) -> list[str]:
    problems = []
    given = list(node.input)
    if not schema.min_input <= len(given) <= schema.max_input:
        problems.append(
            f"takes {_count(schema.min_input, schema.max_input)} inputs "
            f"({', '.join(i.name for i in schema.inputs)}), found {len(given)}"
        )
    optional = onnx.defs.OpSchema.FormalParameterOption.Optional
    missing = [formal.name for formal, name in zip(schema.inputs, given) if not name and formal.option != optional]
    if missing:
        problems.append(f"input {missing[0]} is required, found it left empty")
    if not schema.min_output <= len(node.output) <= schema.max_output:
        problems.append(f"has {_count(schema.min_output, schema.max_output)} outputs, found {len(node.output)}")
    return problems


def _count(low: int, high: int) -> str:
    return str(low) if low == high else f"{low} to {high}"


def _attribute_values(node: onnx.NodeProto, opdef: OpDef, rules: OpRules) -> tuple[dict[str, Any], list[str]]:
    """(name -> value of every attribute that has one here, problems with the attributes)."""
    declared = opdef.schema.attributes
    by_name = {a.name: a for a in node.attribute}
    problems = [
        f"unknown attribute {name!r}; {opdef.onnx_name} takes {', '.join(sorted(declared))}"
        for name in by_name
        if name not in declared
    ]
    values: dict[str, Any] = {}
    for rule in (*rules.attributes, *TRT_RULES):
        attr = by_name.get(rule.name)
        if attr is None:
            if rule.required:
                problems.append(f"attribute {rule.name!r} is required, found it missing")
            continue
        want = int(declared[rule.name].type)
        if attr.type != want:
            problems.append(f"attribute {rule.name!r} must be {_kind(want)}, found {_kind(attr.type)}")
        elif not attr.ref_attr_name:  # a reference inside a function: checked on the calling node
            value = onnx.helper.get_attribute_value(attr)
            problems += [f"attribute {rule.name!r} {p}" for p in _value_problems(rule, attr.type, value)]
            values[rule.name] = value
    return values, problems


def _kind(attr_type: int) -> str:
    return onnx.AttributeProto.AttributeType.Name(attr_type).lower()


def _value_problems(rule: AttrRule, attr_type: int, value: Any) -> list[str]:
    """Out-of-range entries of one attribute value (each entry of a list)."""
    entries = list(value) if attr_type in LIST_KINDS else [value]
    shown = list(value) if attr_type in LIST_KINDS else value
    if attr_type in FLOAT_KINDS and not all(math.isfinite(v) for v in entries):
        return [f"must be finite, found {shown}"]
    must = "must have every entry" if attr_type in LIST_KINDS else "must be"
    for accepts, expected in _bounds(rule):
        if not all(accepts(v) for v in entries):
            return [f"{must} {expected}, found {shown}"]
    if rule.length and not entries:
        return [f"needs one entry per {rule.length}, found none"]
    return []


def _bounds(rule: AttrRule) -> list[tuple[Callable[[Any], bool], str]]:
    """(accepts one value, what is expected) for each bound the rule sets."""
    bounds: list[tuple[Callable[[Any], bool], str]] = []
    if rule.min is not None:
        bounds.append((lambda v: v >= rule.min, f">= {rule.min:g}"))
    if rule.above is not None:
        bounds.append((lambda v: v > rule.above, f"> {rule.above:g}"))
    if rule.max is not None:
        bounds.append((lambda v: v <= rule.max, f"<= {rule.max:g}"))
    if rule.choices is not None:
        bounds.append((lambda v: v in rule.choices, f"one of {', '.join(map(str, rule.choices))}"))
    return bounds


def _input_problems(
    node: onnx.NodeProto, schema: onnx.defs.OpSchema, rules: OpRules, values: Mapping[str, ValueInfo]
) -> tuple[dict[str, int], list[str]]:
    """(dim label -> static size, problems): element types against the schema's type
    constraints, ranks and static sizes against the op's dim labels."""
    dims: dict[str, int] = {}
    seen: dict[str, str] = {}  # dim label -> the "input (axis)" its size came from
    type_of: dict[str, tuple[int, str]] = {}  # type parameter -> (element type, input) first seen
    allowed = {c.type_param_str: c.allowed_type_strs for c in schema.type_constraints}
    problems: list[str] = []
    for formal, name in zip(schema.inputs, node.input):
        info = values.get(name, ValueInfo())
        problems += _type_problems(formal, info.elem_type, allowed, type_of)
        forms = rules.forms(formal.name)
        if not forms or info.shape is None:
            continue
        labels = next((f.split() for f in forms if len(f.split()) == len(info.shape)), None)
        if labels is None:
            shown = " or ".join(f"rank {len(f.split())} [{','.join(f.split())}]" for f in forms)
            problems.append(f"input {formal.name} must have {shown}, found rank {len(info.shape)} {list(info.shape)}")
            continue
        for axis, (want, size) in enumerate(zip(labels, info.shape)):
            problems += _dim_problems(formal.name, axis, want, size, dims, seen)
    return dims, problems


def _type_problems(
    formal: Any, elem_type: int, allowed: Mapping[str, Sequence[str]], type_of: dict[str, tuple[int, str]]
) -> list[str]:
    if not elem_type:
        return []
    found = f"tensor({onnx.TensorProto.DataType.Name(elem_type).lower()})"
    options = allowed.get(formal.type_str, [formal.type_str])
    if found not in options:
        return [f"input {formal.name} must be {' or '.join(options)}, found {found}"]
    first = type_of.setdefault(formal.type_str, (elem_type, formal.name))
    if first[0] != elem_type:
        return [
            f"input {formal.name} must have the element type of {first[1]} "
            f"({onnx.TensorProto.DataType.Name(first[0]).lower()}), found {found}"
        ]
    return []


def _dim_problems(
    input_name: str, axis: int, want: str, size: int | None, dims: dict[str, int], seen: dict[str, str]
) -> list[str]:
    """One axis against its label: a literal size, the size the label took first, or either of
    ``label|1`` (a broadcast axis: it never binds the label)."""
    if size is None:
        return []
    if want.endswith("|1"):
        label = want[:-2]
        if size == 1 or label not in dims or size == dims[label]:
            return []
        return [
            f"input {input_name} axis {axis} must be {label} = {dims[label]} (from {seen[label]}) or 1, found {size}"
        ]
    if want.isdigit():
        ok, expected = size == int(want), want
    else:
        bound = dims.setdefault(want, size)
        seen.setdefault(want, f"{input_name} axis {axis}")
        ok, expected = size == bound, f"{want} = {bound} (from {seen[want]})"
    return [] if ok else [f"input {input_name} axis {axis} must be {expected}, found {size}"]


def _rule_problems(rules: OpRules, attrs: Mapping[str, Any], dims: Mapping[str, int]) -> list[str]:
    """Cross rules whose attributes and dims are all known, and list lengths per dim label."""
    known = {**dims, **attrs}
    problems = []
    for attr in rules.attributes:
        value = attrs.get(attr.name)
        if attr.length and value is not None and attr.length in dims and len(value) != dims[attr.length]:
            problems.append(
                f"attribute {attr.name!r} needs one entry per {attr.length} = {dims[attr.length]}, "
                f"found {len(value)}: {list(value)}"
            )
    for rule in rules.rules:
        if all(name in known for name in rule.uses) and not rule.holds(**{n: known[n] for n in rule.uses}):
            found = ", ".join(f"{n}={known[n]}" for n in rule.uses)
            problems.append(f"needs {rule.expected}, found {found}")
    return problems


__all__ = ["InvalidModelError", "check_model"]
