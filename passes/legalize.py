"""Legalisation: repair the type errors an exporter emits that the ONNX spec allows to be fixed.

``torch.onnx.export`` keeps the dtype of a model's index tensors: a model that indexes with
``torch.arange(T, dtype=torch.int32)`` gets a GatherND (or ScatterND) whose indices are int32,
which the spec does not allow (GatherND / ScatterND take int64 indices only), so
``onnx.checker`` rejects the graph and ONNX Runtime refuses to load it. The repair is a Cast to
int64 in front of such an input: an index's value does not change when widened.

The pass is schema-driven rather than a list of ops: for every standard-domain node (in the
main graph, its subgraphs and the model's functions) each input's dtype is checked against the
op schema's type constraint at the model's opset. An input is repaired when its dtype is an
integer type the constraint does not allow, or when inputs sharing one type variable disagree
(Slice with int32 ``starts`` and int64 ``ends``), provided the constraint allows int64 and no
output shares that type variable (the Cast changes nothing downstream). That covers the index
inputs of GatherND, Gather, GatherElements, ScatterND, ScatterElements and Slice, and any other
op with an index-like input. Any other type error cannot be repaired: :class:`LegalizeError`
names the node. Values of unknown type (e.g. in generic function bodies) are left alone.

:func:`legalize` also repairs a shape error the exporter's own optimiser makes: at opset 23 it fuses
Hugging Face's rotary embedding into ``RotaryEmbedding`` with caches of batch 1, which fails at
batch 2 (:mod:`.rotary_batch` expands them to the batch).
"""

from __future__ import annotations

import functools

import onnx
import onnx_ir as ir

from attn2onnx.errors import UsageError

from .rotary_batch import broadcast_rotary_batch

STANDARD_DOMAINS = ("", "ai.onnx")
INT64 = "tensor(int64)"
_INTEGER = {f"tensor({t})" for t in ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")}


class LegalizeError(UsageError):
    """A node whose input types the ONNX spec rejects and the pass cannot repair."""


class LegalizePass(ir.passes.InPlacePass):
    """Cast the integer inputs that an op's schema does not allow (or that disagree within one
    type variable) to int64; raise :class:`LegalizeError` for a type error it cannot repair.
    ``counts["casts"]`` says how many inputs were cast."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        casts: dict[tuple[int, int], ir.Value] = {}
        scopes: list[tuple[ir.Graph | ir.Function, dict[str, int]]] = [(model.graph, model.opset_imports)]
        scopes += [(f, f.opset_imports) for f in model.functions.values()]
        for scope, opsets in scopes:
            version = opsets.get("", opsets.get("ai.onnx"))
            if version is None:
                continue
            for node in list(ir.traversal.RecursiveGraphIterator(scope)):
                if node.domain in STANDARD_DOMAINS:
                    _legalize_node(node, version, casts)
        self.counts = {"casts": len(casts)} if casts else {}
        return ir.passes.PassResult(model, bool(casts))


@functools.lru_cache(maxsize=None)
def _schema(op_type: str, version: int) -> onnx.defs.OpSchema | None:
    """The op's schema at ``version``; None for an op the onnx package does not know there."""
    try:
        return onnx.defs.get_schema(op_type, version, "")
    except onnx.defs.SchemaError:
        return None


def _type_str(value: ir.Value | None) -> str | None:
    """The value's type as the schema spells it (``tensor(int32)``); None when unknown or not a tensor."""
    if value is None or not isinstance(value.type, ir.TensorType) or value.type.dtype == ir.DataType.UNDEFINED:
        return None
    return f"tensor({value.type.dtype.name.lower()})"


def _input_groups(schema: onnx.defs.OpSchema, node: ir.Node) -> dict[str, list[tuple[int, ir.Value]]]:
    """The node's typed inputs grouped by the schema's type string (a type variable such as
    ``Tind`` or a literal such as ``tensor(int64)``); a variadic formal covers the trailing inputs.
    Non-homogeneous variadics (Loop's carried values) bind each input separately."""
    groups: dict[str, list[tuple[int, ir.Value]]] = {}
    formals = schema.inputs
    for index, value in enumerate(node.inputs):
        if not formals or _type_str(value) is None:
            continue
        formal = formals[min(index, len(formals) - 1)]
        if index >= len(formals) and formal.option != onnx.defs.OpSchema.FormalParameterOption.Variadic:
            continue
        key = formal.type_str if formal.is_homogeneous else f"{formal.type_str}#{index}"
        groups.setdefault(key, []).append((index, value))
    return groups


def _legalize_node(node: ir.Node, version: int, casts: dict[tuple[int, int], ir.Value]) -> None:
    """Repair the node's input types in place, or raise LegalizeError naming it."""
    schema = _schema(node.op_type, version)
    if schema is None:
        return
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    output_vars = {o.type_str for o in schema.outputs}
    for key, members in _input_groups(schema, node).items():
        type_var = key.split("#")[0]
        permitted = allowed.get(type_var, {type_var})
        found = {_type_str(v) for _, v in members}
        if found <= permitted and len(found) == 1:
            continue
        if INT64 not in permitted or type_var in output_vars or not found <= _INTEGER:
            index, value = next(((i, v) for i, v in members if _type_str(v) not in permitted), members[-1])
            raise LegalizeError(
                f"node {node.name!r} ({node.op_type}): input {index} is {_type_str(value)}, which opset {version} "
                f"does not allow with the node's other inputs (allowed: {', '.join(sorted(permitted))}); "
                "a cast to int64 cannot repair it"
            )
        for index, value in members:
            if _type_str(value) != INT64:
                node.replace_input_with(index, _int64(node, index, value, casts))


def _int64(node: ir.Node, index: int, value: ir.Value, casts: dict[tuple[int, int], ir.Value]) -> ir.Value:
    """``value`` cast to int64 in ``node``'s graph, one Cast per value and graph."""
    key = (id(node.graph), id(value))
    if key not in casts:
        cast = ir.node("Cast", [value], attributes={"to": ir.DataType.INT64}, name=f"{node.name}_cast_input_{index}")
        out = cast.outputs[0]
        out.type, out.shape = ir.TensorType(ir.DataType.INT64), value.shape
        node.graph.insert_before(node, cast)
        casts[key] = out
    return casts[key]


def legalize(model: ir.Model) -> ir.Model:
    """Run :class:`LegalizePass` and :func:`.rotary_batch.broadcast_rotary_batch` in place; the model."""
    LegalizePass()(model)
    broadcast_rotary_batch(model)
    return model


__all__ = ["LegalizeError", "LegalizePass", "legalize"]
