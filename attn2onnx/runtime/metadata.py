"""attn2onnx's metadata in a model file, read once, checked against the graph, returned typed.

Export writes three keys into the graph's metadata_props: ``attn2onnx.inputs`` (the inputs'
dims, kinds and id ranges: :func:`attn2onnx.io_spec.specs_to_json`), ``attn2onnx.max_seq``
(the longest sequence the model takes) and, for a decode graph, ``attn2onnx.decode``
(:func:`attn2onnx.models.decode.decode_metadata`: vocabulary, max_len, the names of its three
int64 inputs and every cache tensor; ``"cache": "shared"`` for a graph whose caches are
max-length buffers bound as both input and output, :mod:`attn2onnx.models.shared_decode`).
A file is anyone's to edit, so nothing here trusts them:
each reader parses its key's JSON with bounded size and nesting, checks every field's type and
range (finite positive integers where sizes go), and checks every name against the graph (it
exists, with the rank, static sizes and dtype the metadata implies, and nothing is left out or
extra) before run, generate or validate use any of it. A problem is one :class:`MetadataError`
line naming the key and the field; no other module reads these keys.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Collection, NoReturn, Sequence, get_args

import onnx

from ..errors import UsageError
from ..graph_format import DECODE_KEY, INPUTS, MAX_SEQ_KEY, CacheSpec, past_dim
from ..io_spec import METADATA_KEY as INPUTS_KEY
from ..io_spec import InputSpec, Kind

MAX_CHARS = 1 << 20  # far beyond any real description (a 100-layer decode graph's is ~40 KB)
MAX_DEPTH = 8  # the decode description nests 4 deep ({"caches": [{"dims": [...]}]})
MAX_SIZE = 2**31 - 1  # sizes, lengths and id ranges: what ORT's int32 indexing and numpy take
FLOAT_TYPES = {onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16"}
CACHE_KINDS = ("growing", "shared")  # decode metadata "cache": presents past + seq long, or one shared buffer
SHARED_DIM = "max_cache"  # a shared cache's buffer dim: its past and present are one buffer this long


class MetadataError(UsageError):
    """attn2onnx metadata that is malformed or does not describe the graph it is in."""


@dataclass(frozen=True)
class GraphValue:
    """A graph input or output as its type says: element type, and per dim a static size, a
    dim name, or None (unknown); ``dims`` is None when the rank is unknown."""

    name: str
    elem_type: int
    dims: tuple[int | str | None, ...] | None


@dataclass(frozen=True)
class DecodeMeta:
    """A decode graph's ``attn2onnx.decode``, checked: ``inputs`` are its (ids, mask,
    positions) input names, ``caches`` its cache tensors in graph input order; ``shared``: each
    cache is one buffer of SHARED_DIM positions that the caller binds as both its input and its
    output (written in place; the valid length is attention_mask's); ``aliases``: per cache
    output, a second output of a shared graph that is the same buffer (a cache read as both
    keys and values: GroupQueryAttention writes its rows into present_key and present_value)."""

    variant: str
    vocab_size: int
    max_len: int
    inputs: tuple[str, str, str]
    caches: tuple[CacheSpec, ...]
    shared: bool = False
    aliases: dict[str, str] = field(default_factory=dict)


def graph_values(values: Sequence[onnx.ValueInfoProto], skip: Collection[str] = ()) -> dict[str, GraphValue]:
    """The graph's ``values`` (inputs or outputs) by name, those named in ``skip`` left out."""
    found = {}
    for value in values:
        if value.name in skip:
            continue
        tensor = value.type.tensor_type
        dims = None
        if tensor.HasField("shape"):
            dims = tuple(
                d.dim_value if d.HasField("dim_value") else d.dim_param if d.HasField("dim_param") else None
                for d in tensor.shape.dim
            )
        found[value.name] = GraphValue(value.name, tensor.elem_type, dims)
    return found


def graph_inputs(model: onnx.ModelProto) -> dict[str, GraphValue]:
    """The inputs a caller feeds (initializers listed as inputs left out)."""
    return graph_values(model.graph.input, {i.name for i in model.graph.initializer})


def _fail(key: str, where: str, problem: str) -> NoReturn:
    raise MetadataError(f"metadata {key}: {where + ' ' if where else ''}{problem}")


def _prop(model: onnx.ModelProto, key: str) -> str | None:
    """The value of metadata_props ``key`` (the last one where a file repeats it), None if absent."""
    found = None
    for prop in model.metadata_props:
        if prop.key == key:
            found = prop.value
    return found


def _json(key: str, text: str) -> Any:
    """``text`` parsed, refused above MAX_CHARS or MAX_DEPTH (json.loads recurses per level)."""
    if len(text) > MAX_CHARS:
        _fail(key, "", f"is {len(text):,} characters, more than the {MAX_CHARS:,} any model needs")
    depth = deepest = 0
    for bracket in re.findall(r"[\[\]{}]", re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)):
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
        if deepest > MAX_DEPTH:
            _fail(key, "", f"nests deeper than {MAX_DEPTH} levels")
    try:
        return json.loads(text)
    except ValueError as e:
        _fail(key, "", f"is not valid JSON ({str(e).splitlines()[0]})")


def _object(key: str, where: str, value: Any, required: Sequence[str], optional: Sequence[str] = ()) -> dict:
    """``value`` as a JSON object with every ``required`` field and no field outside both lists."""
    if not isinstance(value, dict):
        _fail(key, where, f"must be an object, got {_show(value)}")
    missing = [f for f in required if f not in value]
    if missing:
        _fail(key, where, f"lacks field {missing[0]!r}")
    extra = sorted(set(value) - set(required) - set(optional))
    if extra:
        _fail(key, where, f"has unknown field {extra[0]!r}")
    return value


def _list(key: str, where: str, value: Any) -> list:
    if not isinstance(value, list):
        _fail(key, where, f"must be a list, got {_show(value)}")
    return value


def _int(key: str, where: str, value: Any, low: int) -> int:
    """``value`` as an integer in [low, MAX_SIZE] (not a bool, a fraction, NaN or infinity)."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= MAX_SIZE:
        _fail(key, where, f"must be an integer in [{low}, {MAX_SIZE}], got {_show(value)}")
    return value


def _str(key: str, where: str, value: Any, choices: Sequence[str] = ()) -> str:
    if not isinstance(value, str) or not value or (choices and value not in choices):
        wanted = f"one of {', '.join(choices)}" if choices else "a non-empty string"
        _fail(key, where, f"must be {wanted}, got {_show(value)}")
    return value


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_dims(
    key: str, where: str, dims: tuple[int | str, ...], value: GraphValue, names: dict[tuple[str, str], str]
) -> None:
    """``dims`` (sizes and dim names) against the graph's ``value``: the same rank, a static
    size where the graph has one and only there, and names that pair with the graph's one to
    one across every call sharing ``names`` (a name need not be the graph's own: torch may
    name a dim itself, but two of ours cannot be one of the graph's, nor one of ours two)."""
    if value.dims is None:
        return
    if len(dims) != len(value.dims):
        _fail(key, where, f"has {len(dims)} dims, but graph tensor {value.name!r} has rank {len(value.dims)}")
    for i, (mine, graphs) in enumerate(zip(dims, value.dims)):
        there = f"graph tensor {value.name!r} has {_show(graphs)} there"
        if graphs is not None and isinstance(mine, int) != isinstance(graphs, int):
            _fail(key, f"{where}[{i}]", f"is {_show(mine)}, but {there}")
        if isinstance(graphs, int) and mine != graphs:
            _fail(key, f"{where}[{i}]", f"is {mine}, but {there}")
        if isinstance(graphs, str):
            paired = (names.setdefault(("ours", mine), graphs), names.setdefault(("graph's", graphs), mine))
            if paired != (graphs, mine):
                _fail(key, f"{where}[{i}]", f"is {mine!r} and {there}, but another dim pairs them otherwise")


def _dims(key: str, where: str, value: Any) -> tuple[int | str, ...]:
    """A dims list: sizes >= 0 and dim names."""
    dims = _list(key, where, value)
    return tuple(d if isinstance(d, str) and d else _int(key, f"{where}[{i}]", d, 0) for i, d in enumerate(dims))


def read_max_seq(model: onnx.ModelProto) -> int | None:
    """``attn2onnx.max_seq``: the longest sequence the model takes; None when not recorded."""
    text = _prop(model, MAX_SEQ_KEY)
    if text is None:
        return None
    if not re.fullmatch(r"[0-9]{1,10}", text):
        _fail(MAX_SEQ_KEY, "", f"must be a positive integer, got {_show(text)}")
    return _int(MAX_SEQ_KEY, "", int(text), 1)


def read_input_specs(model: onnx.ModelProto) -> list[InputSpec] | None:
    """``attn2onnx.inputs`` as InputSpec rows, one per graph input in its order; None when absent.

    Each row names a graph input (every input once), its dims match the graph's (rank, static
    sizes), its kind its dtype (float: float32 / float16 as its precision says, ids: int64 with
    a range ``high`` >= 1, mask: bool)."""
    text = _prop(model, INPUTS_KEY)
    if text is None:
        return None
    rows = _list(INPUTS_KEY, "", _json(INPUTS_KEY, text))
    graph = graph_inputs(model)
    specs: dict[str, InputSpec] = {}
    names: dict[tuple[str, str], str] = {}
    for i, row in enumerate(rows):
        where = f"[{i}]"
        row = _object(INPUTS_KEY, where, row, ("name", "dims", "kind", "high"), ("precision",))
        name = _str(INPUTS_KEY, f"{where}.name", row["name"])
        if name not in graph:
            _fail(INPUTS_KEY, f"{where}.name", f"{name!r} is not an input of the graph")
        if name in specs:
            _fail(INPUTS_KEY, f"{where}.name", f"{name!r} is described twice")
        kind = _str(INPUTS_KEY, f"{where}.kind", row["kind"], get_args(Kind))
        precision = _str(INPUTS_KEY, f"{where}.precision", row.get("precision", "fp32"), ("fp32", "fp16"))
        high = _int(INPUTS_KEY, f"{where}.high", row["high"], 1 if kind == "ids" else 0)
        dims = _dims(INPUTS_KEY, f"{where}.dims", row["dims"])
        _check_dims(INPUTS_KEY, f"{where}.dims", dims, graph[name], names)
        spec = InputSpec(name, dims, kind, high, precision)
        if graph[name].elem_type != onnx.helper.np_dtype_to_tensor_dtype(spec.numpy_dtype):
            _fail(
                INPUTS_KEY,
                where,
                f"says {name!r} is {kind} ({spec.numpy_dtype}), "
                f"but the graph input is {_type_name(graph[name].elem_type)}",
            )
        specs[name] = spec
    missing = [name for name in graph if name not in specs]
    if missing:
        _fail(INPUTS_KEY, "", f"does not describe graph input {missing[0]!r}")
    return [specs[name] for name in graph]


def _type_name(elem_type: int) -> str:
    try:
        return str(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, ValueError):
        return onnx.TensorProto.DataType.Name(elem_type) if elem_type in onnx.TensorProto.DataType.values() else "?"


def read_decode(model: onnx.ModelProto) -> DecodeMeta | None:
    """``attn2onnx.decode`` checked against the graph; None for a graph without it.

    The graph's inputs are exactly the three named ``inputs`` (int64, rank 2) and the caches'
    inputs; every cache's input and output exist with the cache's rank, static sizes and one
    float type, its dims hold ``batch`` and one past dim named as its limit says (``past`` or
    ``past_window{limit}``); the graph has a ``logits`` output whose last dim, where static, is
    the vocabulary. With ``"cache": "shared"`` every cache's past dim is SHARED_DIM (no window
    limit) and its output has its input's dims: one buffer serves both."""
    text = _prop(model, DECODE_KEY)
    if text is None:
        return None
    key = DECODE_KEY
    meta = _object(key, "", _json(key, text), ("variant", "vocab_size", "max_len", "inputs", "caches"), ("cache",))
    shared = _str(key, "cache", meta.get("cache", "growing"), CACHE_KINDS) == "shared"
    variant = _str(key, "variant", meta["variant"])
    vocab_size = _int(key, "vocab_size", meta["vocab_size"], 1)
    max_len = _int(key, "max_len", meta["max_len"], 1)
    graph, outputs = graph_inputs(model), graph_values(model.graph.output)
    names = _list(key, "inputs", meta["inputs"])
    if len(names) != len(INPUTS):
        _fail(key, "inputs", f"must name {len(INPUTS)} inputs ({', '.join(INPUTS)}), got {len(names)}")
    inputs = tuple(_str(key, f"inputs[{i}]", n) for i, n in enumerate(names))
    entries = _list(key, "caches", meta["caches"])
    dim_names: dict[tuple[str, str], str] = {}
    aliases: dict[str, str] = {}
    caches = tuple(
        _cache(key, f"caches[{i}]", c, graph, outputs, dim_names, shared, aliases) for i, c in enumerate(entries)
    )
    described = [*inputs, *(c.input for c in caches)]
    for i, name in enumerate(described):
        where = f"inputs[{i}]" if i < len(inputs) else f"caches[{i - len(inputs)}].input"
        if name not in graph:
            _fail(key, where, f"{name!r} is not an input of the graph")
        if name in described[:i]:
            _fail(key, where, f"{name!r} is named twice")
        if i < len(inputs) and (graph[name].elem_type != onnx.TensorProto.INT64 or _rank(graph[name]) not in (2, None)):
            _fail(key, where, f"{name!r} must be an int64 input of rank 2 in the graph")
    missing = [name for name in graph if name not in described]
    if missing:
        _fail(key, "caches", f"do not describe graph input {missing[0]!r}")
    if len({c.output for c in caches} | set(aliases.values())) != len(caches) + len(aliases):
        _fail(key, "caches", "name one output twice")
    logits = outputs.get("logits")
    if logits is None or logits.elem_type not in FLOAT_TYPES or _rank(logits) not in (3, None):
        _fail(key, "", "describes a decode graph, but the graph has no float 'logits' output of rank 3")
    if logits.dims is not None and isinstance(logits.dims[2], int) and logits.dims[2] != vocab_size:
        _fail(key, "vocab_size", f"is {vocab_size}, but the graph's logits have {logits.dims[2]} entries")
    declared = read_max_seq(model)
    if declared is not None and max_len > declared:
        _fail(key, "max_len", f"is {max_len}, more than the model's {MAX_SEQ_KEY} {declared}")
    return DecodeMeta(variant, vocab_size, max_len, inputs, caches, shared, aliases)  # type: ignore[arg-type]


def _rank(value: GraphValue) -> int | None:
    return None if value.dims is None else len(value.dims)


def _cache(
    key: str,
    where: str,
    value: Any,
    graph: dict[str, GraphValue],
    outputs: dict[str, GraphValue],
    names: dict[tuple[str, str], str],
    shared: bool = False,
    aliases: dict[str, str] | None = None,
) -> CacheSpec:
    """One entry of ``caches`` as a CacheSpec, its input and output checked against the graph
    (dim names paired with the graph's as in :func:`_check_dims`; a ``shared`` cache's output
    too, as it is the same buffer, and its ``alias`` output, recorded in ``aliases``)."""
    entry = _object(key, where, value, ("layer", "input", "output", "dims", "holds", "limit"), ("alias",))
    layer = _int(key, f"{where}.layer", entry["layer"], 0)
    name, output = _str(key, f"{where}.input", entry["input"]), _str(key, f"{where}.output", entry["output"])
    holds = _str(key, f"{where}.holds", entry["holds"])
    limit = None if entry["limit"] is None else _int(key, f"{where}.limit", entry["limit"], 1)
    dims = _dims(key, f"{where}.dims", entry["dims"])
    named = [d for d in dims if isinstance(d, str)]
    if named.count("batch") != 1 or len(named) != 2:
        _fail(key, f"{where}.dims", f"must hold 'batch' and one past dim, got {_show(list(dims))}")
    past = next(d for d in named if d != "batch")
    if shared and (past != SHARED_DIM or limit is not None):
        _fail(key, f"{where}.dims", f"of a shared cache must have past dim {SHARED_DIM!r} and limit null")
    if not shared and past != past_dim(limit):
        _fail(key, f"{where}.limit", f"is {_show(limit)}, but its past dim is {past!r} (want {past_dim(limit)!r})")
    if name not in graph:
        _fail(key, f"{where}.input", f"{name!r} is not an input of the graph")
    if output not in outputs:
        _fail(key, f"{where}.output", f"{output!r} is not an output of the graph")
    for tensor in (graph[name], outputs[output]):
        if tensor.elem_type not in FLOAT_TYPES:
            _fail(key, where, f"graph tensor {tensor.name!r} is {_type_name(tensor.elem_type)}, not a float cache")
    if graph[name].elem_type != outputs[output].elem_type:
        _fail(key, where, f"input {name!r} and output {output!r} differ in dtype")
    _check_dims(key, f"{where}.dims", dims, graph[name], names)
    if _rank(outputs[output]) not in (len(dims), None):
        _fail(key, f"{where}.output", f"{output!r} has rank {_rank(outputs[output])}, its input {len(dims)}")
    if shared:
        _check_dims(key, f"{where}.output", dims, outputs[output], names)
    if "alias" in entry:
        alias = _str(key, f"{where}.alias", entry["alias"])
        if not shared:
            _fail(key, f"{where}.alias", "is only for a shared cache")
        if alias not in outputs or outputs[alias].elem_type != outputs[output].elem_type:
            _fail(key, f"{where}.alias", f"{alias!r} is not an output of the graph of its cache's dtype")
        _check_dims(key, f"{where}.alias", dims, outputs[alias], names)
        if aliases is not None:
            aliases[output] = alias
    return CacheSpec(layer, name, output, dims, holds, limit)


def require_decode(model: onnx.ModelProto, path: str) -> DecodeMeta:
    """:func:`read_decode` for a command that needs a decode graph: an error naming ``path`` otherwise."""
    meta = read_decode(model)
    if meta is None:
        raise UsageError(f"{path} is not a decode graph (export it with 'attn2onnx export MODEL -o OUT.onnx --decode')")
    return meta


__all__ = [
    "CACHE_KINDS",
    "SHARED_DIM",
    "DecodeMeta",
    "GraphValue",
    "MetadataError",
    "graph_inputs",
    "graph_values",
    "read_decode",
    "read_input_specs",
    "read_max_seq",
    "require_decode",
]
