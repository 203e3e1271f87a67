"""ONNX Runtime's own op schemas, for checking the ops ORT runs that ``onnx.checker`` does not know.

ORT's fusions (onnxscript's ``optimize_for_ort``, :mod:`attn2onnx.passes.ort_stage`) emit
contrib ops in ``com.microsoft`` and a few in the default domain (SimplifiedLayerNormalization
for every RMSNorm). ``onnx.checker`` refuses an unknown default-domain op ("No Op registered
for SimplifiedLayerNormalization with domain_version of 20") and skips other domains unchecked.
Here those nodes are checked the way ORT itself checks them when it loads a model: against
ORT's registered schema (``get_all_operator_schema``) for their count of inputs and outputs,
required inputs and attributes, and attribute names and types; the rest of the model still goes
through ``onnx.checker`` (:func:`recheck`), so a damaged file is refused as before.
"""

from __future__ import annotations

import functools
from typing import Any, Iterator

import onnx

# onnx.checker refuses an op it has no schema for in these domains; it skips every other one
_CHECKED_DOMAINS = {"", "ai.onnx.ml", "ai.onnx.training", "ai.onnx.preview.training"}
# ORT-only nodes are moved here for the checker's second look (it skips unknown domains)
_EXEMPT_DOMAIN = "attn2onnx.ort-checked"


def _domain(domain: str) -> str:
    return "" if domain == "ai.onnx" else domain


@functools.cache
def _registry() -> dict[tuple[str, str], list[Any]]:
    """(domain, op type) -> ORT's schemas for it, by ascending since_version (empty when this
    onnxruntime build does not list its schemas)."""
    try:
        from onnxruntime.capi.onnxruntime_pybind11_state import get_all_operator_schema
    except ImportError:  # pragma: no cover - every onnxruntime the project supports has it
        return {}
    registry: dict[tuple[str, str], list[Any]] = {}
    for schema in get_all_operator_schema():
        registry.setdefault((schema.domain, schema.name), []).append(schema)
    for schemas in registry.values():
        schemas.sort(key=lambda s: s.since_version)
    return registry


def ort_schema(domain: str, op_type: str, version: int) -> Any | None:
    """ORT's schema of ``domain::op_type`` at opset ``version`` of that domain (the newest one
    since that version or before), or None where ORT has no such op."""
    found = [s for s in _registry().get((_domain(domain), op_type), []) if s.since_version <= version]
    return found[-1] if found and not found[-1].deprecated else None


def _onnx_knows(domain: str, op_type: str, version: int) -> bool:
    return onnx.defs.has(op_type, version, _domain(domain))


def _graph_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of ``graph`` and of its subgraphs (If / Loop / Scan bodies), by an explicit stack."""
    stack = [graph]
    while stack:
        for node in stack.pop().node:
            yield node
            for attr in node.attribute:
                stack.extend([attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs)


def _nodes(model: onnx.ModelProto) -> Iterator[tuple[onnx.NodeProto, dict[str, int]]]:
    """Every node of ``model`` (graphs, subgraphs, local functions) with the opset versions it is
    read at. A node whose op type or domain is no UTF-8 (protobuf gives bytes) names no op of ORT's:
    left out, the checker refuses it."""
    opsets = {_domain(o.domain): o.version for o in model.opset_import}
    own = [{**opsets, **{_domain(o.domain): o.version for o in f.opset_import}} for f in model.functions]
    functions = [(f.node, versions) for f, versions in zip(model.functions, own)]
    for nodes, versions in [(_graph_nodes(model.graph), opsets), *functions]:
        for node in nodes:
            if isinstance(node.op_type, str) and isinstance(node.domain, str):
                yield node, versions


def _ort_only(node: onnx.NodeProto, opsets: dict[str, int]) -> bool:
    """Whether ``node`` is an op onnx.checker refuses as unknown that ORT has a schema for."""
    domain = _domain(node.domain)
    version = opsets.get(domain)
    return (
        domain in _CHECKED_DOMAINS
        and version is not None
        and not _onnx_knows(domain, node.op_type, version)
        and ort_schema(domain, node.op_type, version) is not None
    )


def recheck(model: onnx.ModelProto, problem: Exception) -> Exception | None:
    """What stays wrong with ``model`` once its ORT-only nodes are let through, given the
    ``problem`` onnx.checker found in its file: None when that problem was an ORT-only op and
    nothing else is wrong, else the first problem found (``problem`` itself when it was not about
    such an op).

    The checker checked the file's graph inputs, outputs and top-level initializers before its
    first node, so the second look reads a copy of the model whose top-level initializers are
    empty stand-ins (no weight is copied) and whose ORT-only nodes sit in a domain the checker
    skips; those nodes are checked against ORT's schemas instead (:func:`node_problem`)."""
    ort_only = {node.op_type for node, opsets in _nodes(model) if _ort_only(node, opsets)}
    if not any(str(problem).startswith(f"No Op registered for {op} ") for op in ort_only):
        return problem
    lean = _without_weights(model)
    for node, opsets in _nodes(lean):
        if _ort_only(node, opsets):
            node.domain = _EXEMPT_DOMAIN
    lean.opset_import.append(onnx.helper.make_opsetid(_EXEMPT_DOMAIN, 1))
    try:
        onnx.checker.check_model(lean)
    except (onnx.checker.ValidationError, ValueError) as e:  # ValueError: a name that is no UTF-8
        return e
    return None


def _without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose top-level initializers are empty tensors of the same names and
    types (the checker accepts a tensor with no elements and no data)."""
    lean = onnx.ModelProto()
    _copy_fields(model, lean, skip="graph")
    _copy_fields(model.graph, lean.graph, skip="initializer")
    lean.graph.initializer.extend(
        onnx.TensorProto(name=t.name, data_type=t.data_type, dims=[0]) for t in model.graph.initializer
    )
    return lean


def _copy_fields(source: Any, target: Any, skip: str) -> None:
    """Copy every set field of protobuf message ``source`` but ``skip`` into ``target``."""
    for field, value in source.ListFields():
        if field.name == skip:
            continue
        if hasattr(value, "MergeFrom"):  # a message or a repeated field
            getattr(target, field.name).MergeFrom(value)
        else:
            setattr(target, field.name, value)


def node_problem(model: onnx.ModelProto) -> str | None:
    """The first node of ``model`` that ORT has a schema for but onnx.checker does not check
    (ORT-only default-domain ops, ORT's contrib domains) and that breaks that schema, described
    in one line; None when there is none. Ops ORT does not know are left to ORT's own load."""
    for node, opsets in _nodes(model):
        domain = _domain(node.domain)
        if domain in _CHECKED_DOMAINS and not _ort_only(node, opsets):
            continue  # onnx.checker's
        version = opsets.get(domain)
        schema = None if version is None else ort_schema(domain, node.op_type, version)
        reason = None if schema is None else _breaks(node, schema)
        if reason is not None:
            op = f"{node.domain}::{node.op_type}" if node.domain else node.op_type
            return f"node {node.name or '(unnamed)'} ({op}) {reason}"
    return None


def _breaks(node: onnx.NodeProto, schema: Any) -> str | None:
    """How ``node`` breaks ORT's ``schema`` (as ORT's load would refuse it), or None."""
    for what, names, low, high, params in (
        ("inputs", node.input, schema.min_input, schema.max_input, schema.inputs),
        ("outputs", node.output, schema.min_output, schema.max_output, schema.outputs),
    ):
        if not low <= len(names) <= high:
            return f"has {len(names)} {what}; ONNX Runtime's schema takes {low} to {high}"
        for param, name in zip(params, names):
            if not name and param.option.name == "Single":
                return f"leaves its required {what[:-1]} {param.name} empty"
    attributes = {a.name: a for a in node.attribute}
    for name, attr in attributes.items():
        if name not in schema.attributes:
            return f"has attribute {name}, which ONNX Runtime's schema does not define"
        expected = schema.attributes[name].type.name
        found = onnx.AttributeProto.AttributeType.Name(attr.type)
        if found != expected:
            return f"has attribute {name} of type {found}; ONNX Runtime's schema wants {expected}"
    missing = [name for name, a in schema.attributes.items() if a.required and name not in attributes]
    if missing:
        return f"lacks required attribute {missing[0]}"
    return None


__all__ = ["node_problem", "ort_schema", "recheck"]
