"""What a model takes as input, so that export, run and validate can make and check inputs.

A model's inputs are described by :class:`InputSpec` rows whose dims are fixed sizes or the
symbols ``"batch"`` and ``"seq"``: the dynamic dims of the exported graph (its dim_params).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Collection, Literal, Sequence

import numpy as np

from .errors import UsageError

if TYPE_CHECKING:  # torch is imported where tensors are read: run / generate / validate of a graph go without it
    import torch

Dim = int | Literal["batch", "seq"]
DYNAMIC_DIMS = ("batch", "seq")
Kind = Literal["float", "ids", "mask", "int_mask", "bool_mask", "positions"]
BOOL_KINDS = ("mask", "bool_mask")


@dataclass(frozen=True)
class InputSpec:
    """One graph input: ``float`` activations (``precision`` fp32 or fp16), ``ids`` token ids in
    [0, high), a bool ``mask`` [batch, seq] with True for real tokens, an ``int_mask`` (an int64
    0/1 ``attention_mask`` as Hugging Face models take it, 1 for real tokens), or ``positions``
    (int64 position ids, an arange along the last dim)."""

    name: str
    dims: tuple[Dim, ...]
    kind: Kind
    high: int = 0
    precision: Literal["fp32", "fp16"] = "fp32"

    @property
    def numpy_dtype(self) -> np.dtype:
        if self.kind == "float":
            return np.dtype(np.float16 if self.precision == "fp16" else np.float32)
        return np.dtype(bool) if self.kind in BOOL_KINDS else np.dtype(np.int64)

    def shape(self, batch: int, seq: int) -> tuple[int, ...]:
        sizes = {"batch": batch, "seq": seq}
        return tuple(sizes[d] if isinstance(d, str) else d for d in self.dims)


def with_precision(specs: Sequence[InputSpec], precision: str) -> list[InputSpec]:
    """The same specs with every float input at ``precision`` (fp32 or fp16)."""
    import dataclasses

    return [dataclasses.replace(s, precision=precision) if s.kind == "float" else s for s in specs]


class DynamicShapeError(UsageError):
    """Dynamic dims that cannot be named or kept: batch and sequence length alike in the
    examples, a dim marked dynamic that is neither, or one that torch specialised on export."""


def specs_from_examples(
    names: Sequence[str],
    examples: Sequence[torch.Tensor],
    dynamic: bool,
    marked: Sequence[Collection[int]] | None = None,
) -> list[InputSpec]:
    """Specs for a module handed over with example inputs, dynamic dims named by their size.

    The reference input is the first float input of rank 3 (``x`` [B, T, D]), else the first
    integer input of rank 2 (``ids`` [B, T]), else the first input (batch only, e.g. images):
    its dim 0 is ``batch`` and dim 1 ``seq``. In the other inputs a dim is ``seq`` wherever its
    size equals T (``freqs`` [T, d/2, 2], ``mask`` [1, 1, T, T]) and ``batch`` only as the
    leading dim of size B (a trailing ``2`` is not the batch). A dim of size 1 stays static,
    so examples with batch or sequence length 1 give a graph fixed there. When B == T a leading
    dim of that size is ambiguous: :class:`DynamicShapeError` asks for examples where they differ.
    Without ``dynamic`` every dim is static. ``marked`` (the dim indices per input that a
    user's ``dynamic_shapes`` makes dynamic) replaces the inference of which dims are dynamic;
    they are named by the same rule, and one that is neither batch nor seq is an error."""
    import torch

    ref, batch, seq = reference_sizes(examples)
    specs = []
    for i, (name, t) in enumerate(zip(names, examples)):
        dims: list[Dim] = list(t.shape)
        for j, size in enumerate(t.shape):
            if not dynamic or (marked is not None and j not in marked[i]):
                continue
            symbol = _dim_name(i == ref, j, size, batch, seq, name)
            if symbol is None and marked is not None:
                raise DynamicShapeError(
                    f"dynamic_shapes makes input {name!r} dim {j} (size {size}) dynamic, but it is neither the "
                    f"example batch ({batch}) nor sequence length ({seq}); pass specs= as well"
                )
            dims[j] = symbol or size
        if t.dtype == torch.bool:
            kind, high = "mask", 0
        elif t.dtype in (torch.int64, torch.int32):
            kind, high = "ids", int(t.max()) + 1
        else:
            kind, high = "float", 0
        precision = "fp16" if t.dtype == torch.float16 else "fp32"
        specs.append(InputSpec(name, tuple(dims), kind, high, precision))
    return specs


def _reference_index(inputs: Sequence[tuple[str, int]]) -> tuple[int | None, bool]:
    """The rule of :func:`specs_from_examples` over (kind, rank) pairs, kind "float", "int"
    (integer, not bool) or "other": the reference input's index (None without one) and whether
    its dim 1 is the sequence length."""
    for i, (kind, rank) in enumerate(inputs):
        if kind == "float" and rank == 3:
            return i, True
    for i, (kind, rank) in enumerate(inputs):
        if kind == "int" and rank == 2:
            return i, True
    if inputs and inputs[0][1] >= 1:
        return 0, False
    return None, False


def reference_sizes(examples: Sequence[torch.Tensor]) -> tuple[int | None, int | None, int | None]:
    """(index, batch, sequence length) of the input that sets them (see :func:`specs_from_examples`);
    works on fake tensors too (a torch.export program's inputs, whose sizes are symbols)."""
    import torch

    kinds = [
        ("float" if t.is_floating_point() else "other" if t.is_complex() or t.dtype == torch.bool else "int", t.dim())
        for t in examples
    ]
    index, has_seq = _reference_index(kinds)
    if index is None:
        return None, None, None
    shape = examples[index].shape
    return index, shape[0], shape[1] if has_seq else None


def reference_input(specs: Sequence[InputSpec]) -> tuple[InputSpec | None, int]:
    """The input whose dims 0 and 1 are the batch size and sequence length (the rule of
    :func:`reference_sizes`, read off the specs) and how many of the two it has (2; 1 for an
    image, which has no sequence; 0 without inputs)."""
    kinds = [("float" if s.kind == "float" else "other" if s.kind in BOOL_KINDS else "int", len(s.dims)) for s in specs]
    index, has_seq = _reference_index(kinds)
    return (None, 0) if index is None else (specs[index], 2 if has_seq else 1)


def fixed_sizes(specs: Sequence[InputSpec]) -> dict[str, int]:
    """The sizes the inputs fix (a --static export, a static program): {"batch": 1, "seq": 32},
    or only one of them, or none for a fully dynamic graph."""
    spec, sizes = reference_input(specs)
    dims = spec.dims[:sizes] if spec else ()
    return {name: d for name, d in zip(("batch", "seq"), dims) if isinstance(d, int)}


def describe_fixed(fixed: dict[str, int]) -> str:
    """``fixed shape 1x32``, ``fixed batch 1`` or ``fixed seq 32`` ("" for none)."""
    if len(fixed) == 2:
        return f"fixed shape {fixed['batch']}x{fixed['seq']}"
    return " ".join(f"fixed {name} {size}" for name, size in fixed.items())


def _dim_name(is_ref: bool, j: int, size: int, batch: int | None, seq: int | None, name: str) -> str | None:
    """``batch``, ``seq`` or None (static) for dim ``j`` (of ``size``) of input ``name``."""
    if size <= 1:
        return None
    if is_ref:
        return "batch" if j == 0 else "seq" if j == 1 and seq is not None else None
    candidates = [d for d, ok in (("batch", j == 0 and size == batch), ("seq", size == seq)) if ok]
    if len(candidates) == 2:
        raise DynamicShapeError(
            f"input {name!r} dim 0 has size {size}, which is both the example batch and sequence length: "
            "give example inputs where they differ (e.g. batch 2, seq 8), or pass dynamic_shapes and specs"
        )
    return candidates[0] if candidates else None


def random_inputs(
    specs: Sequence[InputSpec], batch: int, seq: int, seed: int = 0, pad: bool = True
) -> dict[str, np.ndarray]:
    """Fresh random inputs for ``specs``: floats standard normal, ids uniform in [0, high),
    positions an arange along the last dim. Masks are all real unless ``pad``; with ``pad``, a
    [batch, seq] mask holds the padding patterns attention must get right (see
    :func:`padding_mask`): a bool key padding mask, under variants.md's contract (a query row
    with no allowed key gives a uniform distribution, never NaN), a fully padded row too; an
    integer attention_mask, whose models promise nothing there, a real token in every row."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        shape = spec.shape(batch, seq)
        if spec.kind == "float":
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.numpy_dtype)
        elif spec.kind == "ids":
            feeds[spec.name] = rng.integers(0, spec.high, size=shape, dtype=np.int64)
        elif spec.kind == "positions":
            feeds[spec.name] = np.broadcast_to(np.arange(shape[-1] if shape else 1), shape).astype(np.int64)
        elif spec.kind == "bool_mask" and pad and len(shape) == 2:
            feeds[spec.name] = both_values_mask(rng, *shape)
        elif pad and len(shape) == 2:
            feeds[spec.name] = padding_mask(rng, *shape, empty_row=spec.kind == "mask").astype(spec.numpy_dtype)
        else:
            feeds[spec.name] = np.ones(shape, dtype=spec.numpy_dtype)
    return feeds


def padding_mask(rng: np.random.Generator, batch: int, seq: int, empty_row: bool = True) -> np.ndarray:
    """A [batch, seq] key padding mask (True = real token) whose rows are, in order: all real;
    real only on a random inner span, padded on the left (causal query rows before it see no
    real key) and, when seq > 2, on the right; with ``empty_row``, all padded (every query
    row of that sequence sees no real key); then random spans, possibly full and, with
    ``empty_row``, empty (without it every row keeps a real token)."""
    mask = np.zeros((batch, seq), dtype=bool)
    for row in range(batch):
        if row == 0:
            start, stop = 0, seq
        elif row == 1:
            start = int(rng.integers(1, seq - 1)) if seq > 2 else min(1, seq - 1)
            stop = int(rng.integers(start + 1, seq)) if seq > 2 else seq
        elif row == 2 and empty_row:
            start = stop = 0
        else:
            start, stop = sorted(int(v) for v in rng.integers(0, seq + 1, size=2))
            if stop == start and not empty_row:
                start = min(start, seq - 1)
                stop = start + 1
        mask[row, start:stop] = True
    return mask


def both_values_mask(rng: np.random.Generator, batch: int, seq: int) -> np.ndarray:
    """A [batch, seq] boolean mask whose every row holds both values (for seq > 1): True on a
    span of 1 .. seq - 1 positions, the first row's at the start, the second's at the end, then
    random. The mask of a model whose convention is unknown (a program's or another tool's
    graph's bool input: True = real as here and in SDPA, or True = pad as in fairseq and
    ``nn.MultiheadAttention``'s key_padding_mask): a row of one value would be all padding in one
    of the two, NaN where PyTorch masks with -inf, and so no comparison."""
    mask = np.ones((batch, seq), dtype=bool)
    if seq < 2:
        return mask
    for row in range(batch):
        length = int(rng.integers(1, seq))
        start = 0 if row == 0 else seq - length if row == 1 else int(rng.integers(0, seq - length + 1))
        mask[row] = False
        mask[row, start : start + length] = True
    return mask


def describe_inputs(specs: Sequence[InputSpec]) -> list[str]:
    """One line per input saying what :func:`random_inputs` draws for it (name, dims, dtype,
    values), so a check's report says what it fed."""
    values = {
        "float": "standard normal",
        "mask": "padding mask, rows in turn (as many as the batch has): all real, padded left and right, "
        "all padded, random spans",
        "int_mask": "0/1 padding mask, rows in turn (as many as the batch has): all real, padded left and "
        "right, random spans, none all padded",
        "bool_mask": "boolean mask of unknown convention (True = real or True = pad): every row holds both "
        "values, a span of True at the start, at the end, then random",
        "positions": "positions, an arange along the last dim",
    }
    lines = []
    for spec in specs:
        what = f"token ids in [0, {spec.high})" if spec.kind == "ids" else values[spec.kind]
        dims = ", ".join(str(d) for d in spec.dims)
        lines.append(f"{spec.name} [{dims}] {spec.numpy_dtype}: {what}")
    return lines


def check_feeds(specs: Sequence[InputSpec], feeds: dict[str, np.ndarray]) -> None:
    """Raise a one-line UsageError when ``feeds`` do not fit ``specs`` (names, rank, fixed dims,
    dtype, consistent batch/seq sizes)."""
    missing = [s.name for s in specs if s.name not in feeds]
    extra = sorted(set(feeds) - {s.name for s in specs})
    if missing or extra:  # both named at once: a renamed input (attention_mask for key_padding_mask) is plain
        problems = [f"missing input(s): {', '.join(missing)}"] if missing else []
        problems += [f"unexpected input(s): {', '.join(extra)}"] if extra else []
        takes = ", ".join(f"{s.name} [{', '.join(str(d) for d in s.dims)}] {s.numpy_dtype}" for s in specs)
        raise UsageError(f"{'; '.join(problems)}; the model takes {takes}")
    bound: dict[str, int] = {}
    for spec in specs:
        value = feeds[spec.name]
        if value.dtype != spec.numpy_dtype:
            raise UsageError(f"input {spec.name!r} must be {spec.numpy_dtype}, got {value.dtype}")
        if value.ndim != len(spec.dims):
            raise UsageError(
                f"input {spec.name!r} must have {len(spec.dims)} dims {list(spec.dims)}, got shape {list(value.shape)}"
            )
        for dim, size in zip(spec.dims, value.shape):
            if isinstance(dim, str):
                if bound.setdefault(dim, size) != size:
                    raise UsageError(f"input {spec.name!r}: {dim} is {size} here but {bound[dim]} in another input")
            elif dim != size:
                raise UsageError(f"input {spec.name!r} must have shape {list(spec.dims)}, got {list(value.shape)}")
        if spec.kind == "ids" and spec.high and value.size and (value.min() < 0 or value.max() >= spec.high):
            raise UsageError(f"input {spec.name!r} holds ids outside [0, {spec.high})")


METADATA_KEY = "attn2onnx.inputs"


def specs_to_json(specs: Sequence[InputSpec]) -> str:
    """Serialise specs for the exported model's metadata_props (run/validate read them back)."""
    import json

    return json.dumps(
        [
            {"name": s.name, "dims": list(s.dims), "kind": s.kind, "high": s.high, "precision": s.precision}
            for s in specs
        ]
    )


def specs_from_onnx(model) -> list[InputSpec]:
    """Specs of an ONNX model: from attn2onnx's metadata when present (checked against the
    graph: :func:`attn2onnx.runtime.metadata.read_input_specs`), else from the graph's input
    types with the graph's own dim names (:func:`batch_seq_specs` maps them to batch and seq
    for random inputs). An integer input there is an int_mask or positions when its name says
    so, else ids of unknown range (``high`` 0: any id passes :func:`check_feeds`)."""
    import onnx

    from .runtime.metadata import graph_inputs, read_input_specs

    specs = read_input_specs(model)
    if specs is not None:
        return specs
    specs = []
    for value in graph_inputs(model).values():
        # A dim of unknown size is named after its place: it binds to no other input's dim.
        dims = tuple(f"{value.name}[{j}]" if d is None else d for j, d in enumerate(value.dims or ()))
        elem = value.elem_type
        name = value.name.lower()
        if elem == onnx.TensorProto.BOOL:
            kind = "bool_mask"  # another tool's graph: True = real or True = pad
        elif elem in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            kind = "float"
        else:
            kind = "int_mask" if "mask" in name else "positions" if "position" in name else "ids"
        precision = "fp16" if elem == onnx.TensorProto.FLOAT16 else "fp32"
        specs.append(InputSpec(value.name, dims, kind, 0, precision))
    return specs


# Dim names of graphs exported elsewhere (Hugging Face / Optimum, torch's defaults) that
# :func:`batch_seq_specs` reads as the batch and the sequence dim.
BATCH_NAMES = frozenset({"batch", "batch_size", "batchsize", "bs", "b", "n", "num_sequences"})
SEQ_NAMES = frozenset(
    {"seq", "seq_len", "seqlen", "seq_length", "sequence", "sequence_length", "sequence_len", "length", "t", "s", "l"}
)


def batch_seq_specs(specs: Sequence[InputSpec]) -> list[InputSpec]:
    """``specs`` with every named dim as ``batch`` or ``seq``, so that random inputs can size
    them: a dim named as BATCH_NAMES / SEQ_NAMES say (any case), then, in input order, a dim
    still unnamed is the batch when it leads its input and no dim is the batch yet, else the
    sequence when no dim is that yet. A third dynamic dim (an encoder length, a past length)
    cannot be sized: a one-line UsageError asks for --inputs."""
    import dataclasses

    symbols: dict[str, str] = {}
    for spec in specs:
        for dim in spec.dims:
            if isinstance(dim, str) and dim.lower() in BATCH_NAMES | SEQ_NAMES:
                symbols[dim] = "batch" if dim.lower() in BATCH_NAMES else "seq"
    for spec in specs:
        for j, dim in enumerate(spec.dims):
            if not isinstance(dim, str) or dim in symbols:
                continue
            taken = set(symbols.values())
            if j == 0 and "batch" not in taken:
                symbols[dim] = "batch"
            elif "seq" not in taken:
                symbols[dim] = "seq"
            else:
                raise UsageError(
                    f"input {spec.name!r} dim {j} is {dim!r}, a third dynamic dim besides the batch and sequence "
                    "dims: random inputs cannot size it, pass --inputs"
                )
    return [dataclasses.replace(s, dims=tuple(symbols.get(d, d) for d in s.dims)) for s in specs]
