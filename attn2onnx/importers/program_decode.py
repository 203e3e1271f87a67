"""Decode graphs of torch.export programs that take and return a KV cache:
``attn2onnx export PROGRAM.pt2 --decode``.

The form a program must have (README "Bring your own model"):

* inputs ``input_ids`` [batch, seq] (integer), ``attention_mask`` [batch, past+seq] (1 / True =
  real token), optionally ``position_ids`` [batch, seq], and the cache: per layer a (key, value)
  pair, each [batch, kv_heads, past, head_dim] -- a tuple of pairs under one input
  (``past_key_values=((k0, v0), (k1, v1), ...)``, transformers' legacy cache) or flat tensors
  named per layer (``past_key_values.{i}.key`` / ``.value``, Optimum's names);
* outputs the logits [batch, seq, vocab] first (or under ``logits``) and the updated pairs,
  [batch, kv_heads, past+seq, head_dim], in the same form (a tuple ``(logits, present)``, a
  dict or ModelOutput with ``logits`` and ``past_key_values`` / ``present``, or flat tensors);
* batch, seq and past as Dims, past allowing 0 (the prefill runs with an empty cache).

Cache tensors are recognised by name (``past``/``present``, a layer index, ``key``/``value`` or
the pair's index 0 / 1), shape (rank 4, batch first, the past dim third, alike in every layer) and
pairing (a key and a value per layer, as many out as in); any other form is one UsageError
saying what is expected. The decode graph is written by
:func:`attn2onnx.importers.transformers_decode.write_decode_graph`, in the same names, layout and
``attn2onnx.decode`` metadata as a transformers folder's, so ``generate``, ``validate --decode``
and ``--genai`` take it. :class:`ProgramLM` is the program as those commands expect a causal LM:
``lm(ids, mask)`` the full-sequence logits (the program on an empty cache, positions the padded
index), ``lm.export_decode(path)`` the decode graph.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..errors import UsageError
from ..graph_format import CacheSpec
from ..io_spec import InputSpec
from .transformers_decode import DEFAULT_MAX_LEN, LMConfig, cache_specs, write_decode_graph

EXPECTED = (
    "a decode program takes input_ids [batch, seq], attention_mask [batch, past+seq], optionally position_ids "
    "[batch, seq], and past_key_values: per layer a (key, value) pair [batch, kv_heads, past, head_dim] (a tuple "
    "of pairs, or one tensor each named past_key_values_{i}_key / _value), and returns logits [batch, seq, vocab] "
    "and the updated pairs in the same form, batch, seq and past as Dims (past min 0); see docs/pt2_decode.md"
)
VARIANT = "torch.export program"  # the decode metadata's variant: validate --decode compares it

_ROOT = re.compile(r"^(past_key_values|present_key_values|present|past|key_values|kv_cache)(?=[._]|$)")
_KINDS = {"key": "key", "keys": "key", "k": "key", "value": "value", "values": "value", "v": "value"}


def is_cache_label(label: str) -> bool:
    """Whether an input named ``label`` is (part of) a KV cache, by name."""
    lowered = label.lower()
    return bool(_ROOT.match(lowered) or re.search(r"(key|value|kv)_?cache", lowered))


def _slot(label: str) -> tuple[int | None, str | None]:
    """(layer, "key" / "value") a cache tensor's name says, each None where it says nothing:
    ``past_key_values.0.key``, ``past_key_values_0_1`` (pair index 1: value), ``key_cache.0``."""
    tokens = [t for t in re.split(r"[._]", _ROOT.sub("", label.lower())) if t]
    kind = next((_KINDS[t] for t in tokens if t in _KINDS), None)
    ints = [int(t) for t in tokens if t.isdigit()]
    if kind is None and len(ints) >= 2 and ints[-1] in (0, 1):
        return ints[-2], ("key", "value")[ints[-1]]
    return (ints[0] if kind and len(ints) == 1 else None), kind


def pair_order(labels: list[str]) -> list[int] | None:
    """Positions of the cache tensors named ``labels`` in layer order, key before value; None
    when they do not pair up. Names that say every layer and kind are sorted by them (a cache
    flattened keys first); otherwise the tensors come as key, value, key, value.., and a kind a
    name does say must be the one its position gives."""
    slots = [_slot(label) for label in labels]
    count = len(labels)
    if count == 0 or count % 2:
        return None
    if all(layer is not None and kind for layer, kind in slots):
        want = {(layer, kind) for layer in range(count // 2) for kind in ("key", "value")}
        if set(slots) != want:
            return None
        return sorted(range(count), key=lambda i: (slots[i][0], slots[i][1] != "key"))
    if any(kind not in (None, ("key", "value")[i % 2]) for i, (_, kind) in enumerate(slots)):
        return None
    return list(range(count))


def _label(path: tuple) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _common_prefix(paths: list[tuple]) -> int:
    """How many leading path components all ``paths`` share (all but each one's last)."""
    shortest = min(len(p) for p in paths) - 1
    return next((i for i in range(shortest) if len({p[i] for p in paths}) > 1), shortest)


@dataclass(frozen=True)
class CacheForm:
    """Where a program's decode inputs and outputs sit among its flat inputs / outputs: ids,
    mask, positions (None: it takes none), the past tensors and the present ones in (layer, key
    / value) order, and the cache layout."""

    ids: int
    mask: int
    positions: int | None
    past: list[int]
    logits: int
    present: list[int]
    kv_heads: int
    head_dim: int
    mask_dtype: torch.dtype


def _refuse(path: Path, problem: str) -> UsageError:
    return UsageError(f"{path}: {problem}; {EXPECTED}")


def _symbolic(size: Any) -> bool:
    return not isinstance(size, int)


def _inputs(program: torch.export.ExportedProgram, path: Path) -> tuple[dict[str, int], list[int], list]:
    """The positions of input_ids, attention_mask, position_ids (where taken) among the flat
    inputs, the cache tensors' positions in pair order, and every input's fake tensor."""
    names = list(program.graph_signature.user_inputs)
    nodes = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    metas = [nodes[name].meta["val"] for name in names]
    roles: dict[str, int] = {}
    cache = []
    for i, (name, meta) in enumerate(zip(names, metas)):
        if not isinstance(meta, torch.Tensor):
            raise _refuse(path, f"input {name!r} is not a tensor")
        role = next((r for r in ("input_ids", "attention_mask", "position_ids") if name.lower() == r), None)
        if role is None and is_cache_label(name):
            cache.append(i)
        elif role is None or role in roles:
            raise _refuse(path, f"input {name!r} is none of these")
        else:
            roles[role] = i
    missing = [r for r in ("input_ids", "attention_mask") if r not in roles]
    if missing:
        raise _refuse(path, f"it takes no {missing[0]}")
    order = pair_order([names[i] for i in cache])
    if order is None:
        raise _refuse(path, f"its cache inputs {[names[i] for i in cache]} do not pair as (key, value) per layer")
    return roles, [cache[i] for i in order], metas


def _outputs(program: torch.export.ExportedProgram, path: Path, count: int) -> tuple[int, list[int], list]:
    """The logits' position among the flat outputs, the present tensors' in pair order (``count``
    of them), and every output's fake tensor."""
    spec = program.call_spec.out_spec
    leaves = pytree.tree_flatten_with_path(pytree.tree_unflatten(list(range(spec.num_leaves)), spec))[0]
    labels = [_label(p) for p, _ in leaves]
    output = next(n for n in program.graph.nodes if n.op == "output")
    metas = [getattr(a, "meta", {}).get("val") for a in output.args[0]][: len(leaves)]
    logits = labels.index("logits") if "logits" in labels else 0
    rest = [i for i in range(len(leaves)) if i != logits]
    if len(rest) != count:
        raise _refuse(path, f"it returns {len(rest)} tensors besides the logits for its {count} cache inputs")
    prefix = _common_prefix([leaves[i][0] for i in rest]) if rest else 0
    order = pair_order([_label(leaves[i][0][prefix:]) for i in rest])
    if order is None:
        raise _refuse(path, f"its cache outputs {[labels[i] for i in rest]} do not pair as (key, value) per layer")
    return logits, [rest[i] for i in order], metas


def cache_form(program: torch.export.ExportedProgram, path: Path) -> CacheForm:
    """Recognise the decode form of ``program`` (module docstring); a one-line UsageError saying
    the expected form where it is not."""
    roles, past, metas = _inputs(program, path)
    logits, present, outs = _outputs(program, path, len(past))
    ids = metas[roles["input_ids"]]
    if ids.dim() != 2 or ids.dtype.is_floating_point or not all(_symbolic(s) for s in ids.shape):
        raise _refuse(path, f"input_ids is {tuple(ids.shape)} {ids.dtype}, not integer [batch, seq] with both Dims")
    shapes = [tuple(metas[i].shape) for i in past]
    if (  # batch and past dynamic (torch need not know each cache's equal to the ids' batch)
        any(len(s) != 4 or [_symbolic(d) for d in s] != [True, False, True, False] for s in shapes)
        or len({(s[1], s[3]) for s in shapes}) != 1
        or any(not metas[i].dtype.is_floating_point for i in past)
    ):
        shown = sorted({str(tuple(str(d) for d in s)) for s in shapes})
        raise _refuse(path, f"its cache inputs are {', '.join(shown)}, not alike [batch, kv_heads, past, head_dim]")
    kv_heads, head_dim = shapes[0][1], shapes[0][3]
    for i in present:
        out = outs[i]
        if out is None or out.dim() != 4 or (out.shape[1], out.shape[3]) != (kv_heads, head_dim):
            raise _refuse(path, f"cache output {i} is {None if out is None else tuple(out.shape)}")
    if outs[logits] is None or outs[logits].dim() != 3 or _symbolic(outs[logits].shape[-1]):
        raise _refuse(path, "its first output (or 'logits') is not logits [batch, seq, vocab]")
    ranges = [program.range_constraints.get(s[2].node.expr) for s in shapes]
    low = max((r.lower for r in ranges if r is not None), default=0)
    if low > 0:
        raise _refuse(path, f"its past Dim starts at {low}: the prefill runs with an empty cache (min=0)")
    return CacheForm(
        roles["input_ids"],
        roles["attention_mask"],
        roles.get("position_ids"),
        past,
        logits,
        present,
        kv_heads,
        head_dim,
        metas[roles["attention_mask"]].dtype,
    )


class ProgramDecode(nn.Module):
    """The decode graph's forward: the program on the new ids and the past tensors, put back in
    its input structure; its logits and the updated caches."""

    def __init__(self, program: nn.Module, in_spec: pytree.TreeSpec, form: CacheForm) -> None:
        super().__init__()
        self.program = program
        self.in_spec = in_spec
        self.form = form

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, *past: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        form = self.form
        leaves: list[Any] = [None] * self.in_spec.num_leaves
        leaves[form.ids], leaves[form.mask] = input_ids, attention_mask.to(form.mask_dtype)
        if form.positions is not None:
            leaves[form.positions] = position_ids
        for slot, tensor in zip(form.past, past):
            leaves[slot] = tensor
        args, kwargs = pytree.tree_unflatten(leaves, self.in_spec)
        out = pytree.tree_leaves(self.program(*args, **kwargs))
        return (out[form.logits], *(out[i] for i in form.present))


class ProgramLM(nn.Module):
    """A decode program as the decode commands take a causal LM: ``forward(ids, mask)`` the
    full-sequence logits (an empty cache; positions the padded index, as validate --decode feeds
    the decode graph), ``config`` its vocabulary, longest sequence and variant."""

    def __init__(
        self, call: ProgramDecode, config: LMConfig, dtype: torch.dtype, ranges: dict[str, tuple[int, int | None]]
    ) -> None:
        super().__init__()
        self.call = call
        self.config = config
        self.caches = cache_specs(len(call.form.past) // 2, call.form.kv_heads, call.form.head_dim)
        self.dtype = dtype
        self.ranges = ranges  # the full forward's batch and sequence (the mask's) under the program's Dims

    def train(self, mode: bool = True) -> ProgramLM:
        return self  # a loaded program refuses train / eval: it runs as it was exported

    def decode_lm(self) -> ProgramLM:
        return self

    def decode_cache_specs(self) -> list[CacheSpec]:
        """Its decode graph's cache tensors, Optimum's names, [batch, kv_heads, past, head_dim]."""
        return self.caches

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        step = self.ranges["batch"][1]  # a batch past the program's Dim runs in parts (not while exported)
        if step is None or torch.compiler.is_exporting() or len(input_ids) <= step:
            return self._logits(input_ids, mask)
        parts = range(0, len(input_ids), step)
        return torch.cat([self._logits(input_ids[i : i + step], mask[i : i + step]) for i in parts])

    def _logits(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, seq = input_ids.shape
        positions = torch.arange(seq).expand(batch, seq)
        empty = [torch.zeros(c.shape(batch, 0), dtype=self.dtype) for c in self.caches]
        return self.call(input_ids, mask.long(), positions, *empty)[0]

    def export_decode(self, path: str | os.PathLike, opset: int = 23):
        """Write the decode graph to ``path`` (:func:`write_decode_graph`); the ExportResult."""
        return write_decode_graph(self.call, self.config, self.caches, path, opset)


def _dim_range(program: torch.export.ExportedProgram, size: Any) -> tuple[int, int | None]:
    """(min, max) of a program input's dim ``size`` under its Dims (max None: unbounded)."""
    bounds = program.range_constraints.get(size.node.expr) if _symbolic(size) else None
    if bounds is None:
        return (size, size) if isinstance(size, int) else (0, None)
    return int(bounds.lower), int(bounds.upper) if bounds.upper.is_Integer else None


def program_lm(program: torch.export.ExportedProgram, path: Path) -> ProgramLM:
    """The decode program ``program`` (read from ``path``) as a :class:`ProgramLM`. Its longest
    sequence: the rows of a position table position_ids index, else the attention mask's Dim
    maximum, else :data:`DEFAULT_MAX_LEN`."""
    from ..sources import _vocabulary

    form = cache_form(program, path)
    output = next(n for n in program.graph.nodes if n.op == "output")
    logits = output.args[0][form.logits].meta["val"]
    names = list(program.graph_signature.user_inputs)
    nodes = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    metas = [nodes[name].meta["val"] for name in names]
    table = _vocabulary(nodes[names[form.positions]]) if form.positions is not None else None
    ranges = {
        "batch": _dim_range(program, metas[form.ids].shape[0]),
        "seq": _dim_range(program, metas[form.mask].shape[1]),
    }
    max_len = min((n for n in (table, ranges["seq"][1]) if n), default=DEFAULT_MAX_LEN)
    config = LMConfig(int(logits.shape[-1]), max_len, VARIANT)
    call = ProgramDecode(program.module(), program.call_spec.in_spec, form)
    return ProgramLM(call, config, metas[form.past[0]].dtype, ranges)


def cache_object_error(path: Path, reason: str) -> UsageError | None:
    """The one-line error for a program that does not load because it holds a cache object
    (a DynamicCache registered as a pytree node by the code that saved it; loading has no such
    code): what form to save instead. None for any other reason."""
    from ..torch_files import _NOT_REGISTERED

    found = _NOT_REGISTERED.search(reason)
    if found is None or not found.group(2).endswith("Cache"):
        return None
    return _refuse(path, f"it holds a {found.group(2)} object, which loads only with the code that registered it")


def takes_cache(program: torch.export.ExportedProgram) -> bool:
    """Whether ``program`` has an input named as a cache (then it must have the decode form)."""
    return any(is_cache_label(name) for name in program.graph_signature.user_inputs)


def program_source(program: torch.export.ExportedProgram, path: Path):
    """The ModelSource of a decode program: its full-sequence forward (input_ids,
    attention_mask -> logits), as export without --decode and validate take it."""
    from ..sources import ModelSource

    lm = program_lm(program, path)
    specs = [
        InputSpec("input_ids", ("batch", "seq"), "ids", lm.config.vocab_size),
        InputSpec("attention_mask", ("batch", "seq"), "int_mask"),
    ]
    # sizes bounded by the Dims' ranges, not by max_seq: the exporter would declare seq from 0
    ranges = {name: (max(1, low), high) for name, (low, high) in lm.ranges.items()}
    return ModelSource(lm, specs, ["logits"], None, ranges)


__all__ = ["EXPECTED", "CacheForm", "ProgramLM", "cache_form", "pair_order", "program_lm", "program_source"]
