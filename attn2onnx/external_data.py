"""Checking an ONNX model's external-data references before anything reads them.

A tensor stored outside the ``.onnx`` file names its bytes by ``location`` (a path relative to
the model's folder), ``offset`` and ``length``. A hostile file can point that location anywhere
(``../../etc/passwd``, an absolute path, a symlink out of the folder), and a reader that follows
it copies foreign bytes into the model it writes. :func:`check_external_data` resolves every
location and refuses the model unless each one stays inside the model's folder (symlinks
resolved) and names a byte range that exists, is exactly as long as the tensor's dims and dtype
need, and no other tensor's range overlaps, so optimize, run and validate never open a file the
model does not own, never read past a tensor's bytes, and never turn a few shared bytes into
gigabytes of copies.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterator

import onnx
import onnx_ir as ir

from .errors import UsageError


class ExternalDataError(UsageError):
    """An external-data reference that escapes the model's folder or names missing bytes."""


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from node_tensors(node)


def node_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    """The tensors of ``node``'s attributes, those of its subgraphs included."""
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("sparse_tensor"):
            yield attr.sparse_tensor.values
            yield attr.sparse_tensor.indices
        if attr.HasField("g"):
            yield from _graph_tensors(attr.g)
        for sub in attr.graphs:
            yield from _graph_tensors(sub)


def all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of the model: initializers, Constant and other attribute tensors, in the
    main graph, its subgraphs and the local functions."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from node_tensors(node)


def _int_field(tensor: onnx.TensorProto, info: dict[str, str], key: str) -> int | None:
    if key not in info:
        return None
    try:
        value = int(info[key])
    except ValueError:
        raise ExternalDataError(
            f"tensor {tensor.name!r}: external-data {key} {info[key]!r} is not an integer"
        ) from None
    if value < 0:
        raise ExternalDataError(f"tensor {tensor.name!r}: external-data {key} {value} is negative")
    return value


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    """The bytes ``tensor``'s dims and dtype need (sub-byte types packed, as ONNX stores them);
    refuses a dtype that is unknown or has no fixed size (strings cannot be stored externally)."""
    try:
        dtype = ir.DataType(tensor.data_type)
    except ValueError:
        raise ExternalDataError(f"tensor {tensor.name!r}: unknown dtype {tensor.data_type}") from None
    if dtype in (ir.DataType.UNDEFINED, ir.DataType.STRING):
        raise ExternalDataError(
            f"tensor {tensor.name!r}: a {dtype.name} tensor cannot be stored as external data (no fixed size)"
        )
    if any(d < 0 for d in tensor.dims):
        raise ExternalDataError(f"tensor {tensor.name!r}: dims {list(tensor.dims)} hold a negative size")
    return math.ceil(math.prod(tensor.dims) * dtype.bitwidth / 8)


def check_tensor(tensor: onnx.TensorProto, folder: Path) -> tuple[Path, int, int]:
    """Refuse one external tensor whose bytes lie outside ``folder`` (resolved), past its file's
    end, or whose ``length`` is not what its dims and dtype need (a shorter one would be read
    past, a longer one is not this tensor). Returns the file (resolved), offset and byte count."""
    info = {entry.key: entry.value for entry in tensor.external_data}
    location = info.get("location", "")
    if not location:
        raise ExternalDataError(f"tensor {tensor.name!r} is stored externally but names no location")
    if "\x00" in location:
        raise ExternalDataError(
            f"tensor {tensor.name!r}: external data location {location!r} holds a NUL byte, which no file name can"
        )
    if os.path.isabs(location) or Path(location).drive:
        raise ExternalDataError(
            f"tensor {tensor.name!r}: external data location {location!r} is an absolute path; "
            "it must be relative to the model's folder"
        )
    root = folder.resolve()
    target = (root / location).resolve()
    if root not in target.parents:
        raise ExternalDataError(
            f"tensor {tensor.name!r}: external data location {location!r} leads outside the model's folder {root}"
        )
    if not target.is_file():
        raise ExternalDataError(
            f"tensor {tensor.name!r}: external data file {location!r} does not exist in the model's folder"
        )
    offset = _int_field(tensor, info, "offset") or 0
    length = _int_field(tensor, info, "length")
    needed = _tensor_bytes(tensor)
    if length is not None and length != needed:
        raise ExternalDataError(
            f"tensor {tensor.name!r}: external data length {length} is not the {needed} bytes "
            f"its dims {list(tensor.dims)} of {ir.DataType(tensor.data_type).name} need"
        )
    size = target.stat().st_size
    end = offset + needed
    if end > size:
        raise ExternalDataError(
            f"tensor {tensor.name!r}: external data bytes {offset}..{end} lie past the end of "
            f"{location!r} ({size} bytes)"
        )
    return target, offset, needed


def _refuse_shared_bytes(ranges: list[tuple[Path, int, int, str]]) -> None:
    """Refuse two tensors whose external bytes overlap: every reader and writer would hold (and
    optimize would write) one copy per tensor, so a few bytes on disk could name any number of
    gigabytes (400 tensors on one 1 MiB range made a 400 MiB output)."""
    last: dict[Path, tuple[int, str]] = {}
    for target, offset, end, name in sorted(ranges):
        if target in last and offset < last[target][0]:
            raise ExternalDataError(
                f"tensors {last[target][1]!r} and {name!r} share external data bytes of {target.name!r} "
                f"(from {offset}); each tensor must own its bytes"
            )
        if target not in last or end > last[target][0]:
            last[target] = (end, name)


def check_external_data(model: onnx.ModelProto, model_path: str | os.PathLike) -> None:
    """Check every external-data reference of ``model`` (read from ``model_path`` without its
    weights) before any reader follows one; raises :class:`ExternalDataError` naming the tensor
    (or the two tensors whose bytes overlap)."""
    folder = Path(model_path).parent
    ranges = []
    for tensor in all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            target, offset, length = check_tensor(tensor, folder)
            if length:
                ranges.append((target, offset, offset + length, tensor.name))
    _refuse_shared_bytes(ranges)


__all__ = ["ExternalDataError", "all_tensors", "check_external_data", "check_tensor", "node_tensors"]
