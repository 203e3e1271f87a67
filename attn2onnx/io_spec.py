"""What a model takes as input, so that export, run and validate can make and check inputs.

A model's inputs are described by :class:`InputSpec` rows whose dims are fixed sizes or the
symbols ``"batch"`` and ``"seq"``: the dynamic dims of the exported graph (its dim_params).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch

from .errors import UsageError

Dim = int | Literal["batch", "seq"]
DYNAMIC_DIMS = ("batch", "seq")


@dataclass(frozen=True)
class InputSpec:
    """One graph input: ``float`` activations (``precision`` fp32 or fp16), ``ids`` token ids in
    [0, high), or a bool ``mask`` [batch, seq] with True for real tokens."""

    name: str
    dims: tuple[Dim, ...]
    kind: Literal["float", "ids", "mask"]
    high: int = 0
    precision: Literal["fp32", "fp16"] = "fp32"

    @property
    def numpy_dtype(self) -> np.dtype:
        if self.kind == "float":
            return np.dtype(np.float16 if self.precision == "fp16" else np.float32)
        return {"ids": np.dtype(np.int64), "mask": np.dtype(bool)}[self.kind]

    def shape(self, batch: int, seq: int) -> tuple[int, ...]:
        sizes = {"batch": batch, "seq": seq}
        return tuple(sizes[d] if isinstance(d, str) else d for d in self.dims)


def with_precision(specs: Sequence[InputSpec], precision: str) -> list[InputSpec]:
    """The same specs with every float input at ``precision`` (fp32 or fp16)."""
    import dataclasses

    return [dataclasses.replace(s, precision=precision) if s.kind == "float" else s for s in specs]


def specs_from_examples(names: Sequence[str], examples: Sequence[torch.Tensor], dynamic: bool) -> list[InputSpec]:
    """Specs for a module handed over with example inputs: dim 0 is the batch and, for
    rank >= 2 inputs other than images (rank 4), dim 1 the sequence."""
    specs = []
    for name, t in zip(names, examples):
        dims: list[Dim] = list(t.shape)
        if dynamic:
            dims[0] = "batch"
            if t.dim() in (2, 3):
                dims[1] = "seq"
        if t.dtype == torch.bool:
            kind, high = "mask", 0
        elif t.dtype in (torch.int64, torch.int32):
            kind, high = "ids", int(t.max()) + 1
        else:
            kind, high = "float", 0
        precision = "fp16" if t.dtype == torch.float16 else "fp32"
        specs.append(InputSpec(name, tuple(dims), kind, high, precision))
    return specs


def random_inputs(specs: Sequence[InputSpec], batch: int, seq: int, seed: int = 0, pad: bool = True) -> dict[str, np.ndarray]:
    """Fresh random inputs for ``specs``. Masks are all true unless ``pad``; with ``pad``, a
    [batch, seq] key padding mask holds the padding patterns attention must get right
    (variants.md: a query row with no allowed key gives a uniform distribution, never NaN): see
    :func:`padding_mask`."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        shape = spec.shape(batch, seq)
        if spec.kind == "float":
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.numpy_dtype)
        elif spec.kind == "ids":
            feeds[spec.name] = rng.integers(0, spec.high, size=shape, dtype=np.int64)
        else:
            feeds[spec.name] = padding_mask(rng, *shape) if pad and len(shape) == 2 else np.ones(shape, dtype=bool)
    return feeds


def padding_mask(rng: np.random.Generator, batch: int, seq: int) -> np.ndarray:
    """A [batch, seq] key padding mask (True = real token) whose rows are, in order: all real;
    real only on a random inner span, so padded on the left (causal query rows before it see
    no real key) and, when seq > 2, on the right; all padded (every query row of that
    sequence sees no real key); then random spans, possibly empty or full."""
    mask = np.zeros((batch, seq), dtype=bool)
    for row in range(batch):
        if row == 0:
            start, stop = 0, seq
        elif row == 1:
            start = int(rng.integers(1, seq)) if seq > 1 else 0
            stop = int(rng.integers(start + 1, seq)) if seq - start > 1 else seq
        elif row == 2:
            start = stop = 0
        else:
            start, stop = sorted(int(v) for v in rng.integers(0, seq + 1, size=2))
        mask[row, start:stop] = True
    return mask


def check_feeds(specs: Sequence[InputSpec], feeds: dict[str, np.ndarray]) -> None:
    """Raise a one-line UsageError when ``feeds`` do not fit ``specs`` (names, rank, fixed dims,
    dtype, consistent batch/seq sizes)."""
    missing = [s.name for s in specs if s.name not in feeds]
    if missing:
        raise UsageError(f"missing input(s): {', '.join(missing)}")
    extra = sorted(set(feeds) - {s.name for s in specs})
    if extra:
        raise UsageError(f"unexpected input(s): {', '.join(extra)}; the model takes {', '.join(s.name for s in specs)}")
    bound: dict[str, int] = {}
    for spec in specs:
        value = feeds[spec.name]
        if value.dtype != spec.numpy_dtype:
            raise UsageError(f"input {spec.name!r} must be {spec.numpy_dtype}, got {value.dtype}")
        if value.ndim != len(spec.dims):
            raise UsageError(f"input {spec.name!r} must have {len(spec.dims)} dims {list(spec.dims)}, got shape {list(value.shape)}")
        for dim, size in zip(spec.dims, value.shape):
            if isinstance(dim, str):
                if bound.setdefault(dim, size) != size:
                    raise UsageError(f"input {spec.name!r}: {dim} is {size} here but {bound[dim]} in another input")
            elif dim != size:
                raise UsageError(f"input {spec.name!r} must have shape {list(spec.dims)}, got {list(value.shape)}")
        if spec.kind == "ids" and value.size and (value.min() < 0 or value.max() >= spec.high):
            raise UsageError(f"input {spec.name!r} holds ids outside [0, {spec.high})")


METADATA_KEY = "attn2onnx.inputs"


def specs_to_json(specs: Sequence[InputSpec]) -> str:
    """Serialise specs for the exported model's metadata_props (run/validate read them back)."""
    import json

    return json.dumps([{"name": s.name, "dims": list(s.dims), "kind": s.kind, "high": s.high, "precision": s.precision}
                       for s in specs])


def specs_from_onnx(model) -> list[InputSpec]:
    """Specs of an ONNX model: from attn2onnx's metadata when present, else from the graph's
    input types (float, bool masks; integer inputs then need explicit --inputs)."""
    import json

    import onnx

    meta = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY in meta:
        return [InputSpec(d["name"], tuple(d["dims"]), d["kind"], d["high"], d.get("precision", "fp32"))
                for d in json.loads(meta[METADATA_KEY])]
    initializers = {i.name for i in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        dims = tuple(d.dim_param if d.dim_param else d.dim_value for d in tensor.shape.dim)
        elem = tensor.elem_type
        if elem == onnx.TensorProto.BOOL:
            kind = "mask"
        elif elem in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            kind = "float"
        else:
            kind = "ids"
        precision = "fp16" if elem == onnx.TensorProto.FLOAT16 else "fp32"
        specs.append(InputSpec(value.name, dims, kind, 0, precision))
    return specs
