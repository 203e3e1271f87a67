"""ONNX Runtime GenAI folders from decode graphs (``attn2onnx export --decode``).

:func:`write_genai_folder` turns a decode graph into a folder that ``onnxruntime_genai`` runs as
is (``og.Model(folder)``, ``og.Generator``): ``model.onnx`` (a copy of the graph, adapted as
below), ``genai_config.json``, the native kernel library where the graph holds ``ai.attn2onnx``
nodes, and a tokenizer for byte-vocabulary models.

What GenAI expects, and how the copy meets it (onnxruntime-genai 0.18, its DefaultKeyValueCache):

- Every cache layer is one key / value pair of equal shape ``[batch, heads, past, head_size]``
  (``past_key_values.%d.key`` / ``.value`` in, ``present.%d.key`` / ``.value`` out), which
  GenAI allocates, grows by the new positions each step and reorders along batch. mha,
  optimised and super caches are such pairs already and are bound as they are. Other caches
  (dcmha's token-major K / V and key factors, efficient's x, reuse's fresh-head K beside every
  head's V, any local-window layer) are *packed*: the copy takes a pair of GenAI tensors, cuts
  them back into the layer's own caches at the start of the graph and joins its presents into
  the pair at the end. Packing is pure data movement (slices, concats, reshapes), so the tokens
  are the same as the graph's own; it costs copies of the cache each step. A window layer's pair
  holds every position (GenAI's sliding-window caches are the fixed-shape kind for NPUs); the
  graph still reads only the last ones. A layer whose caches hold an odd number of values per
  position cannot be cut into two equal halves: :func:`plan_caches` refuses it in one line.
- ``eos_token_id`` and ``pad_token_id`` must be ids of the vocabulary and the logits must have
  ``vocab_size`` entries. The LMs here have no EOS or padding token, so the copy's logits get
  one more entry, id ``V`` (the graph's vocabulary size), at the lowest finite value: never
  picked, greedy or sampled. It is the padding id and, unless ``eos_id`` names a real token,
  the EOS id, so GenAI runs to ``max_length`` as ``attn2onnx generate`` does; ids ``>= V`` fed in
  (padding) are clamped to ``V - 1`` before the embedding (their positions are masked).
- The native library is copied into the folder and named relatively: GenAI refuses a
  ``custom_ops_library`` outside the model's folder. It is compiled for the exporting CPU
  (``-march=native``); for another machine write the folder with ``native=False`` (ORT then runs
  the ops' standard-op function bodies, the same numbers, slower) or put that machine's build
  in its place.
- Tokenizer: GenAI reads ``tokenizer.json`` (Hugging Face's format). For a 256-id byte
  vocabulary the folder gets a byte-level BPE one with no merges, so id = byte value, as
  ``attn2onnx generate --prompt`` encodes. Other vocabularies have no tokenizer: feed ids with
  ``generator.append_tokens`` and read them back with ``get_sequence`` / ``get_next_tokens``.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import UsageError

if TYPE_CHECKING:
    from torch import nn

    from .models.decode import CacheSpec

GENAI_KEY = "attn2onnx.genai"  # metadata of the copy: how each layer's caches map to GenAI's pairs
MODEL_FILE, CONFIG_FILE = "model.onnx", "genai_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
PAST, PRESENT = "past_key_values.%d.", "present.%d."
INTERNAL = "attn2onnx_genai/"  # prefix of the copy's own value names
BYTE_VOCAB = 256
MIN_OPSET = 15  # Shape(start, end); Slice / Squeeze / Unsqueeze / Pad with their sizes as inputs
INT64_MAX = np.iinfo(np.int64).max


@dataclass(frozen=True)
class Part:
    """One of a layer's caches inside its GenAI pair, as a 4-D ``[batch, heads, past, width]``
    form: a head-major ``[batch, H, past, D]`` cache as it is; any other (token-major, or flat:
    head-major moved token-major) with its past dim moved to axis 1 and the rest flattened."""

    spec: CacheSpec
    heads: int
    width: int
    flat: bool

    @property
    def past_axis(self) -> int:
        return _past_axis(self.spec)


@dataclass(frozen=True)
class LayerPlan:
    """How one layer's caches are held by GenAI: ``direct`` (its key / value pair as they are)
    or packed: ``parts`` joined in this order along ``axis`` (1: heads, 3: width) and cut in two
    equal halves, the key ``[batch, heads, past, width]`` and the value of the same shape."""

    layer: int
    direct: bool
    parts: tuple[Part, ...]
    axis: int
    heads: int
    width: int

    def describe(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "direct": self.direct,
            "axis": self.axis,
            "shape": ["batch", self.heads, "past", self.width],
            "parts": [{"cache": p.spec.input, "heads": p.heads, "width": p.width, "flat": p.flat} for p in self.parts],
        }


@dataclass
class GenAIFolder:
    """What :func:`write_genai_folder` wrote."""

    path: Path
    layers: list[LayerPlan]
    vocab_size: int  # GenAI's: the graph's + 1 (the padding / no-EOS id)
    eos_id: int
    library: Path | None
    tokenizer: bool
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the command: what the folder holds."""
        packed = sum(not p.direct for p in self.layers)
        files = [CONFIG_FILE, f"{MODEL_FILE} ({len(self.layers)} cache layers, {packed} packed)"]
        if self.library is not None:
            files.append(self.library.name)
        if self.tokenizer:
            files.append("tokenizer.json (bytes)")
        return f"wrote {self.path}: " + ", ".join(files) + "".join(f"; {n}" for n in self.notes)


def _past_axis(spec: CacheSpec) -> int:
    """Index of the cache's past dim (its one dim name other than batch)."""
    return next(i for i, d in enumerate(spec.dims) if isinstance(d, str) and d != "batch")


def _part(spec: CacheSpec, flat: bool) -> Part:
    """``spec`` in its 4-D form: head-major as it is unless ``flat``, else token-major flattened."""
    p = _past_axis(spec)
    if not flat and len(spec.dims) == 4 and p == 2:
        return Part(spec, int(spec.dims[1]), int(spec.dims[3]), False)
    rest = [int(d) for i, d in enumerate(spec.dims) if i not in (0, p)]
    return Part(spec, 1, math.prod(rest), True)


def _is_pair(layer: int, specs: Sequence[CacheSpec]) -> bool:
    """The layer's caches are a key / value pair GenAI binds as it is: head-major, equal dims,
    every position kept, in GenAI's names."""
    if len(specs) != 2 or any(s.limit is not None for s in specs):
        return False
    key, value = specs
    names = [(s.input, s.output) for s in specs]
    want = [(PAST % layer + n, PRESENT % layer + n) for n in ("key", "value")]
    return names == want and key.dims == value.dims and len(key.dims) == 4 and _past_axis(key) == 2


def _plan_layer(layer: int, specs: Sequence[CacheSpec]) -> LayerPlan:
    if _is_pair(layer, specs):
        part = _part(specs[0], False)
        return LayerPlan(layer, True, tuple(_part(s, False) for s in specs), 3, part.heads, part.width)
    for spec in specs:
        if spec.dims[0] != "batch":
            raise UsageError(f"GenAI cannot hold cache {spec.input}: GenAI reorders caches along dim 0, its batch")
    natural = [_part(s, False) for s in specs]
    if len({p.heads for p in natural}) == 1 and sum(p.width for p in natural) % 2 == 0:
        parts, axis = natural, 3
    elif len({p.width for p in natural}) == 1 and sum(p.heads for p in natural) % 2 == 0:
        parts, axis = natural, 1
    else:
        parts, axis = [_part(s, True) for s in specs], 3
        total = sum(p.width for p in parts)
        if total % 2:
            names = ", ".join(s.input for s in specs)
            raise UsageError(
                f"GenAI cannot hold layer {layer}'s cache: GenAI keeps each layer as a key / value pair of "
                f"equal shape, and its caches ({names}) hold {total} values per position, an odd number"
            )
    heads = parts[0].heads if axis == 3 else sum(p.heads for p in parts) // 2
    width = sum(p.width for p in parts) // 2 if axis == 3 else parts[0].width
    return LayerPlan(layer, False, tuple(parts), axis, heads, width)


def plan_caches(caches: Sequence[CacheSpec]) -> list[LayerPlan]:
    """How GenAI holds each layer's caches (see the module docstring); a one-line UsageError for
    a layer it cannot hold. ``caches`` as in the decode metadata (``read_decode(...).caches``)
    or :func:`attn2onnx.models.decode.cache_specs` (so export can refuse before it exports)."""
    layers: dict[int, list[CacheSpec]] = {}
    for spec in caches:
        layers.setdefault(spec.layer, []).append(spec)
    if not layers:
        raise UsageError("GenAI needs a model with a cache (the decode graph has none)")
    return [_plan_layer(layer, specs) for layer, specs in sorted(layers.items())]


class _Graph:
    """Node and constant builder for the adapters, every name under :data:`INTERNAL`."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.front: list[onnx.NodeProto] = []
        self.back: list[onnx.NodeProto] = []
        self.count = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{INTERNAL}{hint}_{self.count}"

    def const(self, values: Any, dtype: Any = np.int64) -> str:
        name = self.name("const")
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(values, dtype=dtype), name))
        return name

    def node(self, nodes: list, op: str, inputs: list[str], output: str | None = None, **attrs: Any) -> str:
        output = output or self.name(op.lower())
        nodes.append(helper.make_node(op, inputs, [output], name=self.name(op), **attrs))
        return output

    def slice(self, nodes: list, x: str, axis: int, start: int | str, end: int | str) -> str:
        """``x[start:end]`` along ``axis``; ``start`` / ``end`` an int or the name of a [1] tensor."""
        start = self.const([start]) if isinstance(start, int) else start
        end = self.const([end]) if isinstance(end, int) else end
        return self.node(nodes, "Slice", [x, start, end, self.const([axis])])

    def join(self, nodes: list, xs: list[str], axis: int, output: str | None = None) -> str:
        if len(xs) == 1:
            return self.node(nodes, "Identity", xs, output)
        return self.node(nodes, "Concat", xs, output, axis=axis)


def _rename(graph: onnx.GraphProto, mapping: dict[str, str]) -> None:
    """Rename values in every node of ``graph`` and its subgraphs (inputs and outputs)."""
    from .onnx_io import _all_nodes

    for node in _all_nodes(graph):
        for names in (node.input, node.output):
            for i, name in enumerate(names):
                if name in mapping:
                    names[i] = mapping[name]


def _to_form(g: _Graph, nodes: list, x: str, part: Part) -> str:
    """A cache in its own layout -> its 4-D form [batch, heads, past, width]."""
    if not part.flat:
        return x
    p = part.past_axis
    if p != 1:
        perm = [0, p] + [i for i in range(1, len(part.spec.dims)) if i != p]
        x = g.node(nodes, "Transpose", [x], perm=perm)
    x = g.node(nodes, "Reshape", [x, g.const([0, 0, -1])])
    return g.node(nodes, "Unsqueeze", [x, g.const([1])])


def _from_form(g: _Graph, nodes: list, x: str, part: Part) -> str:
    """The 4-D form back to the cache's own layout."""
    if not part.flat:
        return x
    p = part.past_axis
    perm = [0, p] + [i for i in range(1, len(part.spec.dims)) if i != p]
    rest = [int(part.spec.dims[i]) for i in perm[2:]]
    x = g.node(nodes, "Squeeze", [x, g.const([1])])
    x = g.node(nodes, "Reshape", [x, g.const([0, 0, *rest])])
    if p != 1:
        x = g.node(nodes, "Transpose", [x], perm=[int(i) for i in np.argsort(perm)])
    return x


def _ranges(plan: LayerPlan) -> list[tuple[int, int]]:
    """Each part's [start, end) along the plan's axis in key ++ value."""
    size = (lambda p: p.heads) if plan.axis == 1 else (lambda p: p.width)
    ends = np.cumsum([size(p) for p in plan.parts]).tolist()
    return list(zip([0, *ends[:-1]], ends))


def _unpack(g: _Graph, plan: LayerPlan, key: str, value: str) -> dict[str, str]:
    """Nodes cutting GenAI's pair back into the layer's caches (the graph's cache inputs, renamed
    under :data:`INTERNAL`). A window layer's graph input is the last ``limit`` positions of the
    pair's full length: returns window cache input -> that full-length value, for :func:`_pack`."""
    half = plan.heads if plan.axis == 1 else plan.width
    full = {}
    for part, (start, end) in zip(plan.parts, _ranges(plan)):
        pieces = []
        if start < half:
            whole = start == 0 and end >= half
            pieces.append(key if whole else g.slice(g.front, key, plan.axis, start, min(end, half)))
        if end > half:
            whole = start <= half and end == 2 * half
            pieces.append(value if whole else g.slice(g.front, value, plan.axis, max(start - half, 0), end - half))
        x = _from_form(g, g.front, g.join(g.front, pieces, plan.axis), part)
        spec = part.spec
        if spec.limit is not None:
            full[spec.input] = x
            x = g.slice(g.front, x, part.past_axis, -spec.limit, INT64_MAX)
        g.node(g.front, "Identity", [x], INTERNAL + spec.input)
    return full


def _new_rows(g: _Graph, part: Part, present: str, past_full: str, seq: str) -> str:
    """A window layer's present (its last ``limit`` positions) as every position: the full past,
    then the step's ``seq`` new rows (the present's last min(seq, limit); rows the window has
    already dropped, of a prompt longer than it, as zeros: no later step reads them)."""
    p, rank = part.past_axis, len(part.spec.dims)
    kept = g.node(g.back, "Min", [seq, g.const([part.spec.limit])])
    tail = g.slice(g.back, present, p, g.node(g.back, "Neg", [kept]), INT64_MAX)
    dropped = g.node(g.back, "Sub", [seq, kept])
    pads = g.node(g.back, "Concat", [g.const([0] * p), dropped, g.const([0] * (2 * rank - p - 1))], axis=0)
    return g.join(g.back, [past_full, g.node(g.back, "Pad", [tail, pads])], p)


def _pack(g: _Graph, plan: LayerPlan, full: dict[str, str], seq: str) -> None:
    """Nodes joining the layer's presents into GenAI's pair (present.L.key / .value)."""
    half = plan.heads if plan.axis == 1 else plan.width
    key, value = [], []
    for part, (start, end) in zip(plan.parts, _ranges(plan)):
        x = INTERNAL + part.spec.output
        if part.spec.limit is not None:
            x = _new_rows(g, part, x, full[part.spec.input], seq)
        x = _to_form(g, g.back, x, part)
        if start < half:
            key.append(x if end <= half else g.slice(g.back, x, plan.axis, 0, half - start))
        if end > half:
            value.append(x if start >= half else g.slice(g.back, x, plan.axis, half - start, end - start))
    g.join(g.back, key, plan.axis, PRESENT % plan.layer + "key")
    g.join(g.back, value, plan.axis, PRESENT % plan.layer + "value")


def _value_info(name: str, elem_type: int, dims: Sequence[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, list(dims))


def adapt_graph(model: onnx.ModelProto, meta: Any, plans: list[LayerPlan]) -> onnx.ModelProto:
    """The GenAI copy of a decode graph (in place): packed layers' caches behind GenAI pairs,
    logits with the extra never-picked id, input ids clamped into the vocabulary."""
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise UsageError(f"GenAI folders need a graph of ONNX opset >= {MIN_OPSET}, this one is {opset}")
    ids, _, _ = meta.inputs
    inputs = {v.name: v for v in graph.input}
    outputs = {v.name: v for v in graph.output}
    float_type = inputs[meta.caches[0].input].type.tensor_type.elem_type
    packed = [p for p in plans if not p.direct]
    mapping = {ids: INTERNAL + ids, "logits": INTERNAL + "logits"}
    for plan in packed:
        for part in plan.parts:
            mapping.update({part.spec.input: INTERNAL + part.spec.input, part.spec.output: INTERNAL + part.spec.output})
    _rename(graph, mapping)
    g = _Graph(graph)
    g.node(g.front, "Min", [ids, g.const([meta.vocab_size - 1])], INTERNAL + ids)
    seq = g.node(g.front, "Shape", [ids], start=1, end=2)
    for plan in packed:
        for part in plan.parts:
            graph.input.remove(inputs[part.spec.input])
            graph.output.remove(outputs[part.spec.output])
        key, value = (PAST % plan.layer + n for n in ("key", "value"))
        graph.input.extend(_value_info(n, float_type, ["batch", plan.heads, "past", plan.width]) for n in (key, value))
        full = _unpack(g, plan, key, value)
        _pack(g, plan, full, seq)
        graph.output.extend(
            _value_info(PRESENT % plan.layer + n, float_type, ["batch", plan.heads, "past+seq", plan.width])
            for n in ("key", "value")
        )
    logits = outputs["logits"]
    lowest = np.finfo(helper.tensor_dtype_to_np_dtype(logits.type.tensor_type.elem_type)).min
    pad = g.const(lowest, helper.tensor_dtype_to_np_dtype(logits.type.tensor_type.elem_type))
    g.node(g.back, "Pad", [INTERNAL + "logits", g.const([0, 0, 0, 0, 0, 1]), pad], "logits")
    dims = logits.type.tensor_type.shape.dim
    if len(dims) == 3:
        dims[2].Clear()
        dims[2].dim_value = meta.vocab_size + 1
    nodes = g.front + list(graph.node) + g.back
    del graph.node[:]
    graph.node.extend(nodes)
    props = {p.key: p.value for p in model.metadata_props}
    for key in ("attn2onnx.decode", "attn2onnx.inputs"):  # they describe the graph before adapting
        props.pop(key, None)
    props[GENAI_KEY] = json.dumps({"vocab_size": meta.vocab_size + 1, "layers": [p.describe() for p in plans]})
    del model.metadata_props[:]
    helper.set_model_props(model, props)
    return model


def genai_config(meta: Any, plans: list[LayerPlan], eos_id: int, library: str | None) -> dict[str, Any]:
    """genai_config.json for the adapted graph: GenAI's default input / output names (the copy
    uses them), the cache geometry of layer 0 (other layers' shapes GenAI reads from the graph),
    no EOS / padding inside the vocabulary (see the module docstring), greedy search to max_len."""
    session: dict[str, Any] = {"log_id": "attn2onnx"}
    if library is not None:
        session["custom_ops_library"] = library
    first = plans[0]
    phantom = meta.vocab_size
    return {
        "model": {
            "type": "llama",  # GenAI's plain decoder-only model: input ids, mask, positions, K / V pairs
            "vocab_size": meta.vocab_size + 1,
            "context_length": meta.max_len,
            "bos_token_id": phantom,
            "eos_token_id": eos_id,
            "pad_token_id": phantom,
            "decoder": {
                "filename": MODEL_FILE,
                "session_options": session,
                "head_size": first.width,
                "hidden_size": first.heads * first.width,
                "num_attention_heads": first.heads,
                "num_key_value_heads": first.heads,
                "num_hidden_layers": len(plans),
                "inputs": {
                    "input_ids": meta.inputs[0],
                    "attention_mask": meta.inputs[1],
                    "position_ids": meta.inputs[2],
                    "past_key_names": PAST + "key",
                    "past_value_names": PAST + "value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": PRESENT + "key",
                    "present_value_names": PRESENT + "value",
                },
            },
        },
        "search": {
            "max_length": meta.max_len,
            "min_length": 0,
            "do_sample": False,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,  # the graph grows its caches (Concat), it does not write in place
        },
    }


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level tokenizers index tokens by."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def write_byte_tokenizer(folder: Path) -> None:
    """tokenizer.json / tokenizer_config.json of a byte-level BPE without merges: token id = the
    byte's value (UTF-8 text in, bytes out), the encoding ``attn2onnx generate --prompt`` uses."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(folder / TOKENIZER_FILES[0]))
    config = {"tokenizer_class": "GPT2Tokenizer", "add_bos_token": False, "add_eos_token": False}
    (folder / TOKENIZER_FILES[1]).write_text(json.dumps(config, indent=2) + "\n")


def _library(model: onnx.ModelProto, folder: Path, native: bool, notes: list[str]) -> Path | None:
    """Copy the native kernel library into ``folder`` when the graph holds ai.attn2onnx nodes
    (and ``native``); None when it does not need one, or the library cannot be built here (the
    ops' function bodies run then: a note says so)."""
    from .custom_ops import DOMAIN
    from .onnx_io import _all_nodes
    from .runtime import native as native_lib

    if not native or not any(n.domain == DOMAIN for n in _all_nodes(model.graph)):
        return None
    reason = native_lib.unavailable_reason()
    if reason is not None:
        notes.append(f"no native kernel library ({reason}): ORT runs the ops' function bodies")
        return None
    target = folder / native_lib.LIBRARY_NAME
    shutil.copyfile(native_lib.library_path(), target)
    return target


def check_folder(path: str | Path) -> Path:
    """The output folder: an existing folder, or a new one in an existing folder (refused in one
    line otherwise, before any export work)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"GenAI output {path} exists and is not a folder")
    if not path.exists() and not path.parent.is_dir():
        raise UsageError(f"GenAI output {path}: no such folder {path.parent}")
    return path


def check_request(folder: str | Path, *, decode: bool, output: str | Path) -> None:
    """``export --genai FOLDER``'s arguments, before torch is imported: it needs --decode, a graph
    it can read back (no pipe or device as the output) and a folder it can write."""
    from .fileio import written_through

    if not decode:
        raise UsageError("--genai needs --decode (a GenAI folder holds a decode graph)")
    if written_through(output):
        raise UsageError(f"{output} is a pipe or device, which --genai cannot read back to write the folder")
    check_folder(folder)


def check_export(model: nn.Module, folder: str | Path) -> None:
    """What ``export --decode --genai FOLDER`` checks before it exports (seconds): the folder
    can be written and GenAI can hold every layer's cache (one-line UsageErrors)."""
    from .models.decode import cache_specs, check_decodable

    check_folder(folder)
    plan_caches(cache_specs(check_decodable(model)))


def check_shared(variant: str) -> None:
    """A one-line UsageError for a shared-KV graph (``--shared-kv``) GenAI cannot run: the folder
    keeps ``past_present_share_buffer`` false, so GenAI hands the graph growing caches and expects
    presents one step longer. GroupQueryAttention returns those from a past of any length; dcmha's
    CacheUpdate writes into the buffer it is given, which has no room for the new rows."""
    if variant == "dcmha":
        raise UsageError(
            "--genai with --shared-kv is not supported for dcmha: GenAI hands the graph growing caches "
            "(past_present_share_buffer false), which have no room for CacheUpdate's new rows; "
            "write the GenAI folder from the growing graph (without --shared-kv)"
        )


def write_genai_folder(
    decode_path: str | Path, folder: str | Path, *, eos_id: int | None = None, native: bool = True
) -> GenAIFolder:
    """Write the GenAI folder of the decode graph at ``decode_path`` into ``folder`` (created if
    missing; the files named in the module docstring are replaced, nothing else is touched).
    ``eos_id``: a token id of the vocabulary GenAI stops after (default none: it runs to
    max_length). ``native``: copy the kernel library in when the graph needs one."""
    from .onnx_io import check_model, load_onnx, save_model
    from .runtime.metadata import require_decode

    folder = check_folder(folder)
    model = load_onnx(decode_path, load_weights=True)
    meta = require_decode(model, str(decode_path))
    if meta.shared:
        check_shared(meta.variant)
    if eos_id is not None and not 0 <= eos_id < meta.vocab_size:
        raise UsageError(f"eos id {eos_id} is outside the model's vocabulary [0, {meta.vocab_size})")
    plans = plan_caches(meta.caches)
    adapt_graph(model, meta, plans)
    folder.mkdir(exist_ok=True)
    notes: list[str] = []
    save_model(model, folder / MODEL_FILE, check=check_model)
    library = _library(model, folder, native, notes)
    eos = meta.vocab_size if eos_id is None else eos_id
    config = genai_config(meta, plans, eos, None if library is None else library.name)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    tokenizer = meta.vocab_size == BYTE_VOCAB
    if tokenizer:
        write_byte_tokenizer(folder)
    return GenAIFolder(folder, plans, meta.vocab_size + 1, eos, library, tokenizer, notes)


__all__ = [
    "GENAI_KEY",
    "GenAIFolder",
    "LayerPlan",
    "Part",
    "adapt_graph",
    "check_export",
    "check_folder",
    "check_request",
    "check_shared",
    "genai_config",
    "plan_caches",
    "write_byte_tokenizer",
    "write_genai_folder",
]
