"""Weight-only quantization of a graph whose weights live in external data, one weight at a
time (issue 24: the 2.8B decode graph's 5.7 GB of fp16 weights on a 24 GB machine).

:func:`attn2onnx.quantize.quantize_model` loads every weight and lets ORT's
``MatMulNBitsQuantizer`` rewrite the whole ModelProto: the input weights, the quantized ones
and the protobuf copies of them all are in memory at once. Here the graph is read without its
weights, and for each MatMul whose weight is a 2-D initializer ORT's own per-node quantizer
(``DefaultWeightOnlyQuantizer.quantize_matmul``, the one ``MatMulNBitsQuantizer`` calls) is
given that one weight, read from the source file, in a graph of its own; the MatMulNBits node
it returns takes the MatMul's place and its packed weights and scales go straight to the
output's external-data file. Every other
external initializer is copied across in chunks, except those under :data:`EXTERNAL_FROM`
bytes, brought inline with every external attribute tensor (a Reshape's or ConstantOfShape's
shape, a Constant's value: ONNX Runtime reads those only inline). Peak memory: the graph,
ORT's imports and a few copies of the largest single weight.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, BinaryIO

import onnx

from ..external_data import check_tensor, node_tensors
from ..onnx_io import DATA_SUFFIX

ALIGN = 4096  # offsets of external tensors (page-aligned: ORT can memory-map them)
EXTERNAL_FROM = 1024  # bytes from which a tensor goes to external data (onnx's own default)
_CHUNK = 1 << 24


class DataWriter:
    """Appends tensors to one external-data file and makes each TensorProto point at its bytes."""

    def __init__(self, file: BinaryIO, location: str) -> None:
        self.file, self.location = file, location

    def _start(self) -> int:
        offset = -(-self.file.tell() // ALIGN) * ALIGN
        self.file.seek(offset)
        return offset

    def _point(self, tensor: onnx.TensorProto, offset: int, length: int) -> None:
        tensor.data_location = onnx.TensorProto.EXTERNAL
        del tensor.external_data[:]
        for key, value in (("location", self.location), ("offset", offset), ("length", length)):
            tensor.external_data.add(key=key, value=str(value))

    def move(self, tensor: onnx.TensorProto) -> None:
        """Write ``tensor``'s raw bytes to the file and leave it a reference to them."""
        offset = self._start()
        self.file.write(tensor.raw_data)
        self._point(tensor, offset, len(tensor.raw_data))
        tensor.ClearField("raw_data")

    def copy(self, tensor: onnx.TensorProto, folder: Path) -> None:
        """Copy external ``tensor``'s bytes from its file under ``folder`` (checked to stay
        there) in chunks, and point it at the copy."""
        source, start, length = check_tensor(tensor, folder)
        offset = self._start()
        with open(source, "rb") as f:
            f.seek(start)
            left = length
            while left:
                chunk = f.read(min(left, _CHUNK))
                if not chunk:
                    raise OSError(f"{source} ended inside tensor {tensor.name!r}")
                self.file.write(chunk)
                left -= len(chunk)
        self._point(tensor, offset, length)


def _loaded(tensor: onnx.TensorProto, folder: Path) -> onnx.TensorProto:
    """A copy of ``tensor`` with its bytes inline (read from its external file if it has one)."""
    loaded = onnx.TensorProto()
    loaded.CopyFrom(tensor)
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        source, start, length = check_tensor(tensor, folder)
        with open(source, "rb") as f:
            f.seek(start)
            loaded.raw_data = f.read(length)
        loaded.data_location = onnx.TensorProto.DEFAULT
        del loaded.external_data[:]
    return loaded


def _used_names(graph: onnx.GraphProto) -> set[str]:
    """Every value name a node (subgraphs included) or a graph output reads."""
    from ..onnx_io import _all_nodes

    return {name for node in _all_nodes(graph) for name in node.input} | {o.name for o in graph.output}


def quantize_streamed(
    model: onnx.ModelProto, source: Path, target: Path, node_quantizer: Any, targets: set[int]
) -> int:
    """Rewrite ``model`` (read from ``source`` without its weights) in place: each top-graph
    MatMul whose index is in ``targets`` (its weight a 2-D initializer) becomes what
    ``node_quantizer.quantize_matmul`` makes of it given its weight alone; new tensors of
    :data:`EXTERNAL_FROM` bytes or more and the external weights kept go to ``target``'s data
    file (``<target>.data``). The count of MatMuls replaced."""
    folder = Path(source).parent
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    location = target.name + DATA_SUFFIX
    nodes, added, written, count = [], [], set(), 0
    for node in [*graph.node, *(n for f in model.functions for n in f.node)]:
        for tensor in node_tensors(node):  # attribute tensors: inline (ORT reads no others)
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                tensor.CopyFrom(_loaded(tensor, folder))
    with open(target.parent / location, "wb") as f:
        writer = DataWriter(f, location)
        for index, node in enumerate(graph.node):
            if index not in targets:
                nodes.append(node)
                continue
            scratch = onnx.GraphProto()
            scratch.initializer.add().CopyFrom(_loaded(initializers[node.input[1]], folder))
            nodes.extend(node_quantizer.quantize_matmul(node, [scratch]))
            for tensor in scratch.initializer[1:]:
                if len(tensor.raw_data) >= EXTERNAL_FROM:
                    writer.move(tensor)
                added.append(onnx.TensorProto())
                added[-1].CopyFrom(tensor)  # a reference into scratch would keep all of it alive
                written.add(tensor.name)
            count += 1
            del scratch
        del graph.node[:]
        graph.node.extend(nodes)
        graph.initializer.extend(added)
        used = _used_names(graph)
        kept = [t for t in graph.initializer if t.name in used]
        for tensor in kept:
            if tensor.data_location != onnx.TensorProto.EXTERNAL or tensor.name in written:
                continue
            if check_tensor(tensor, folder)[2] < EXTERNAL_FROM:  # shapes ORT's inference reads
                tensor.CopyFrom(_loaded(tensor, folder))
            else:
                writer.copy(tensor, folder)
        del graph.initializer[:]  # extend copies the messages: after they are changed
        graph.initializer.extend(kept)
        f.flush()
        os.fsync(f.fileno())
    return count


__all__ = ["ALIGN", "EXTERNAL_FROM", "DataWriter", "quantize_streamed"]
