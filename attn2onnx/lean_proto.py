"""Turning an ``onnx_ir.Model`` into protobuf without a copy of every weight.

``ir.serde.serialize_model`` copies each in-memory initializer into the ModelProto, and
``SerializeToString`` copies the whole message again (twice while protobuf builds the bytes):
for a model with inline weights a checker or a writer held three to four copies of them at once.
Here the weights are left out of the one big message:

* :func:`structure_proto` gives the model with each large initializer as an external-data stub
  (dims and dtype, no bytes), which is all the op checks and ONNX shape inference read;
* :func:`independent_copy` gives a copy of the model to change (a pass run for trial) whose
  tensors are new objects over the same bytes;
* :func:`save_inline` writes the model with its weights in the file, one initializer at a time:
  protobuf merges concatenated messages (a repeated field appends), so the stubbed model's bytes
  followed by one ``ModelProto{graph{initializer: [w]}}`` per weight parse as the whole model.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterable, Iterator

import onnx
import onnx_ir as ir

# Initializers above this many bytes are left out; small ones (Reshape's shape, scales) stay,
# as shape inference reads their values.
STUB_BYTES = 2**16
_STUB_LOCATION = "weights-left-out"


@contextlib.contextmanager
def stubbed_weights(
    model: ir.Model, graphs: Iterable[ir.Graph] | None = None
) -> Iterator[list[tuple[ir.Value, ir.TensorProtocol]]]:
    """While the block runs, every in-memory initializer above :data:`STUB_BYTES` of ``graphs``
    (default: all of ``model``'s) is an ``ir.ExternalTensor`` naming no real file; yields
    (value, its tensor) for each, and puts the tensors back after, whatever happens."""
    swapped = []
    for graph in model.graphs() if graphs is None else graphs:
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is None or isinstance(tensor, (ir.ExternalTensor, ir.StringTensor)):
                continue
            if tensor.nbytes > STUB_BYTES:
                swapped.append((value, tensor))
                value.const_value = ir.ExternalTensor(
                    _STUB_LOCATION,
                    offset=0,
                    length=tensor.nbytes,
                    dtype=tensor.dtype,
                    shape=tensor.shape,
                    name=value.name,
                )
    try:
        yield swapped
    finally:
        for value, tensor in swapped:
            value.const_value = tensor


def structure_proto(model: ir.Model) -> onnx.ModelProto:
    """``model`` as a ModelProto whose large initializers are external-data stubs: for checks
    that read dims, dtypes and small constants only (the model is left as it was)."""
    with stubbed_weights(model):
        return ir.serde.serialize_model(model)


def save_inline(model: ir.Model, path: str | os.PathLike) -> None:
    """Write ``model`` to ``path`` with every weight inside the file (as ``ir.save`` without
    external data does), holding one weight's bytes at a time instead of copies of them all.
    The model must fit protobuf's 2 GiB limit, as any single-file model must."""
    with stubbed_weights(model, [model.graph]) as swapped:
        proto = ir.serde.serialize_model(model)
    left_out = {value.name for value, _ in swapped}
    kept = [t for t in proto.graph.initializer if t.name not in left_out]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    with open(path, "wb") as f:
        f.write(proto.SerializeToString())
        del proto
        for value, tensor in swapped:
            weight = ir.serde.serialize_tensor(tensor)
            weight.name = value.name
            f.write(onnx.ModelProto(graph=onnx.GraphProto(initializer=[weight])).SerializeToString())


def _view(tensor: ir.TensorProtocol) -> ir.TensorProtocol:
    """A new tensor object over ``tensor``'s bytes: renaming one leaves the other's name alone,
    and no weight is copied (an external one stays a reference to its file)."""
    if isinstance(tensor, ir.ExternalTensor):
        return ir.ExternalTensor(
            tensor.location,
            offset=tensor.offset,
            length=tensor.length,
            dtype=tensor.dtype,
            shape=tensor.shape,
            name=tensor.name,
            base_dir=tensor.base_dir,
        )
    if isinstance(tensor, ir.StringTensor):
        return ir.StringTensor(tensor.string_data(), shape=tensor.shape, name=tensor.name)
    return ir.LazyTensor(lambda: tensor, dtype=tensor.dtype, shape=tensor.shape, name=tensor.name)


def independent_copy(model: ir.Model) -> ir.Model:
    """A copy of ``model`` to change freely, sharing no tensor object with it yet no weight
    copied. ``Model.clone`` shares the constant tensors, and renaming a value renames its tensor
    (the onnxscript optimizer does): through a shared tensor that renamed the original's
    initializers, and those of a ModelProto it was read from. Each constant of the clone gets
    its own tensor object over the same bytes (:func:`_view`); a serialize / deserialize round
    trip did the same by copying every weight twice, and lost external data's folder."""
    copy = model.clone()
    views: dict[int, ir.TensorProtocol] = {}

    def view(tensor: ir.TensorProtocol) -> ir.TensorProtocol:
        return views.setdefault(id(tensor), _view(tensor))

    for graph in copy.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                value.const_value = view(value.const_value)
    for node in ir.traversal.RecursiveGraphIterator(copy.graph):
        for value in node.outputs:
            if value.const_value is not None:
                value.const_value = view(value.const_value)
        for key, attr in node.attributes.items():
            if attr.type == ir.AttributeType.TENSOR:
                node.attributes[key] = ir.AttrTensor(key, view(attr.as_tensor()), doc_string=attr.doc_string)
    return copy


__all__ = ["STUB_BYTES", "independent_copy", "save_inline", "stubbed_weights", "structure_proto"]
