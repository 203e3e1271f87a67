"""Weights that are read only when they are written, and the weight-only nodes folded into them.

torch's exporter, run without its optimizer on a ``meta`` model, feeds some weights through
nodes that only rearrange them (``Linear``: Transpose; DCMHA's ``dw1``: Reshape). Its optimizer
would fold those by computing them, which needs the values: here each such node is folded into
a new lazy weight instead (:func:`fold_weight_nodes`), computed from the checkpoint when the
writer asks for its bytes, so the graph comes out as the in-memory export's (transposed weights
as initializers) without any weight in memory. :func:`skip_lazy` keeps the optimizer itself
away from lazy weights.
"""

from __future__ import annotations

from typing import Callable

import onnx_ir as ir
import torch

Source = Callable[[], torch.Tensor]


class StreamedTensor(ir.LazyTensor):
    """A weight computed by ``source`` (a torch tensor of this dtype and shape) each time its
    bytes are needed, never cached: the writer holds one at a time. ``key`` names the
    parameter it comes from (kept through folds), for writing a layer's weights together."""

    def __init__(self, source: Source, dtype: ir.DataType, shape: tuple[int, ...], name: str, key: str) -> None:
        from torch.onnx._internal.exporter._core import TorchTensor

        super().__init__(lambda: TorchTensor(source(), name=name), dtype, ir.Shape(shape), name=name)
        self.source = source
        self.key = key


def is_streamed(value: ir.Value | None) -> bool:
    return value is not None and isinstance(value.const_value, StreamedTensor)


def skip_lazy(node: ir.Node) -> bool | None:
    """``should_fold`` for the onnxscript optimizer: never fold a node that reads a streamed
    weight (folding would read it now and keep the result in memory); else the default rules."""
    return False if any(is_streamed(v) for v in node.inputs) else None


def _const_ints(value: ir.Value | None) -> list[int] | None:
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    return None if tensor is None else [int(x) for x in tensor.numpy().reshape(-1)]


def _folded(node: ir.Node, shape: tuple[int, ...], source: Source) -> tuple[tuple[int, ...], Source] | None:
    """The shape and source of ``node``'s output when it only rearranges a weight of ``shape``
    (Transpose, or Reshape to a constant shape); None for any other node."""
    if node.domain not in ("", "ai.onnx") or len(node.outputs) != 1:
        return None
    if node.op_type == "Transpose":
        attr = node.attributes.get("perm")
        perm = list(attr.as_ints()) if attr is not None else list(range(len(shape)))[::-1]
        return tuple(shape[p] for p in perm), lambda: source().permute(perm).contiguous()
    if node.op_type == "Reshape":
        target = _const_ints(node.inputs[1] if len(node.inputs) > 1 else None)
        if target is None:
            return None
        attr = node.attributes.get("allowzero")
        literal = attr is not None and attr.as_int()  # torch writes allowzero=1: a 0 is a 0
        dims = target if literal else [shape[i] if d == 0 else d for i, d in enumerate(target)]
        new = tuple(torch.empty(shape, device="meta").reshape(dims).shape)
        return new, lambda: source().reshape(new)
    return None


def fold_weight_nodes(graph: ir.Graph) -> int:
    """Fold every Transpose / Reshape whose data input is a streamed weight used only there into
    a new streamed weight named as the node's output (repeated for chains); the count folded."""
    folded = 0
    pending = [v for v in graph.initializers.values() if is_streamed(v)]
    while pending:
        value = pending.pop()
        uses = list(value.uses())
        if len(uses) != 1 or uses[0].idx != 0 or value.is_graph_output():
            continue
        node = uses[0].node
        tensor = value.const_value
        assert isinstance(tensor, StreamedTensor)
        result = _folded(node, tuple(tensor.shape.numpy()), tensor.source)
        if result is None or node.outputs[0].is_graph_output():
            continue
        shape, source = result
        out = node.outputs[0]
        name = out.name
        new = ir.Value(
            name=None,
            shape=ir.Shape(shape),
            type=ir.TensorType(tensor.dtype),
            const_value=StreamedTensor(source, tensor.dtype, shape, name, tensor.key),
        )
        ir.convenience.replace_all_uses_with(out, new)
        graph.remove(node, safe=True)
        del graph.initializers[value.name]
        out.name = None
        new.name = name
        graph.register_initializer(new)
        pending.append(new)
        folded += 1
    return folded


def order_by_source(graph: ir.Graph, rank: Callable[[str], tuple]) -> None:
    """Reorder ``graph``'s initializers so that the streamed ones come in the order ``rank``
    gives their source keys (folds appended theirs at the end, last layer first): the writer
    then reads each layer of the checkpoint once."""
    values = list(graph.initializers.values())
    streamed = sorted((v for v in values if is_streamed(v)), key=lambda v: rank(v.const_value.key))
    graph.initializers.clear()
    for value in [v for v in values if not is_streamed(v)] + streamed:
        graph.register_initializer(value)


__all__ = ["StreamedTensor", "fold_weight_nodes", "is_streamed", "order_by_source", "skip_lazy"]
