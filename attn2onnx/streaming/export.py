"""Export a DCFormer release folder with its weights streamed from the checkpoint to the
external-data file, never all in memory (issue 24).

1. :class:`~.release.ReleaseCheckpoint` checks the folder from the safetensors headers.
2. The CausalLM is built on the ``meta`` device in the export dtype (no weight memory) and
   traced by torch's exporter without its optimizer (:func:`attn2onnx.exporter.trace`).
3. Every parameter initializer (a meta tensor) becomes a :class:`~.fold.StreamedTensor` that
   reads it from the checkpoint by name; weight-only Transpose / Reshape nodes are folded into
   such tensors (:mod:`.fold`); then torch's own optimizer and fusions run, kept off them.
4. The graph is finished as a proto with each weight as an external-data stub (op bodies,
   metadata, dynamic-dim checks: :func:`attn2onnx.exporter.finish_proto`), read back into
   onnx_ir with the streamed tensors put back, and written by ``onnx_ir.save`` with every
   weight in ``<name>.onnx.data``: one tensor is computed and written at a time, so the 2 GB
   protobuf limit never applies (the .onnx holds the graph only). onnx.checker (full check,
   by path) runs on the temporary before it replaces anything.

Peak memory: the graph, one layer of float32 tensors (the import's mapping works per layer),
and one weight in the export dtype; not the model.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Iterator

import onnx
import onnx_ir as ir
import torch

from ..errors import UsageError
from .fold import StreamedTensor, fold_weight_nodes, order_by_source, skip_lazy
from .release import ReleaseCheckpoint

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_STUB = "streamed-weight"


def meta_model(checkpoint: ReleaseCheckpoint, dtype: str) -> torch.nn.Module:
    """The folder's CausalLM with every parameter on the ``meta`` device, in ``dtype``."""
    from ..models import build_model

    with torch.device("meta"):
        model = build_model(checkpoint.spec.model_config())
    return model.to(TORCH_DTYPES[dtype]).eval()


def attach_weights(graph: ir.Graph, checkpoint: ReleaseCheckpoint, dtype: str, prefix: str = "") -> int:
    """Make every meta initializer of ``graph`` (named by its parameter, after ``prefix``) read
    its value from ``checkpoint`` in ``dtype`` when written; the count. An initializer the
    checkpoint does not name, still on ``meta``, is an error (it could not be written)."""
    torch_dtype = TORCH_DTYPES[dtype]
    count = 0
    for name, value in graph.initializers.items():
        raw = getattr(value.const_value, "raw", None)
        if not isinstance(raw, torch.Tensor) or not raw.is_meta:
            continue
        key = name[len(prefix) :] if name.startswith(prefix) else name
        if key not in checkpoint.shapes:
            raise UsageError(f"the traced graph holds {name!r}, which no checkpoint tensor gives")
        value.const_value = StreamedTensor(
            lambda key=key: checkpoint.tensor(key).to(torch_dtype),
            value.const_value.dtype,
            tuple(raw.shape),
            name,
            key,
        )
        count += 1
    return count


def optimize_streamed(model: ir.Model) -> None:
    """What torch's exporter runs with ``optimize=True`` (onnxscript's optimizer and fusions)
    plus attn2onnx's legalisation, with the streamed weights never read."""
    import onnxscript.optimizer
    import onnxscript.rewriter.onnx_fusions

    from ..passes.legalize import legalize

    fold_weight_nodes(model.graph)
    onnxscript.optimizer.optimize_ir(model, should_fold=skip_lazy)
    onnxscript.rewriter.onnx_fusions.fuse(model)
    fold_weight_nodes(model.graph)  # Reshapes whose shape the optimizer has just made constant
    legalize(model)
    order_by_source(model.graph, _layer_rank)


def _layer_rank(key: str) -> tuple[int, str]:
    """Layer tensors by layer number, the rest (embedding, norm, head) after them."""
    parts = key.split(".")
    return (int(parts[2]), key) if key.startswith("trunk.blocks.") else (1 << 30, key)


@contextlib.contextmanager
def _stubbed(model: ir.Model) -> Iterator[dict[str, StreamedTensor]]:
    """While the block runs, each streamed weight is an external-data stub (no bytes)."""
    swapped = {}
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if isinstance(tensor, StreamedTensor):
            swapped[name] = tensor
            value.const_value = ir.ExternalTensor(
                _STUB, offset=0, length=tensor.nbytes, dtype=tensor.dtype, shape=tensor.shape, name=name
            )
    try:
        yield swapped
    finally:
        for name, tensor in swapped.items():
            model.graph.initializers[name].const_value = tensor


def write_streamed(model: ir.Model, proto: onnx.ModelProto, streamed: dict[str, StreamedTensor], path: Path) -> Path:
    """Write ``proto`` (weights as stubs) with ``streamed`` put back, every weight to
    ``<path>.data``, atomically, checked by onnx.checker before it replaces anything."""
    from ..fileio import atomic_output
    from ..onnx_io import DATA_SUFFIX, check_model

    final = ir.serde.deserialize_model(proto)
    for name, tensor in streamed.items():
        final.graph.initializers[name].const_value = tensor
    with atomic_output(path, companions=[DATA_SUFFIX]) as tmp:
        ir.save(final, tmp, external_data=tmp.name + DATA_SUFFIX)
        check_model(tmp)
    return path


def export_streamed(
    folder: str | os.PathLike,
    path: str | os.PathLike,
    *,
    dtype: str = "fp32",
    decode: bool = False,
    opset: int = 23,
    batch: int = 2,
    seq: int = 16,
    checkpoint: ReleaseCheckpoint | None = None,
):
    """Export the release folder ``folder`` to ``path`` (+ ``path``.data) in ``dtype`` (fp32,
    fp16 or bf16), the full-sequence graph (example ``batch`` x ``seq``) or with ``decode`` the
    prefill / decode graph (:mod:`attn2onnx.models.decode`); returns the ExportResult."""
    from ..exporter import export_result, finish_proto, trace
    from ..io_spec import random_inputs, with_precision
    from ..models import decode as dec
    from ..sources import from_module

    if dtype not in ("fp32", "fp16"):
        raise UsageError(
            f"a {dtype} graph is not valid ONNX for this model (opset 23's Einsum takes no bfloat16) and ONNX "
            "Runtime's CPU runs no bfloat16 MatMul, Add or Mul; export fp16 or fp32 (the bf16 checkpoint "
            "converts exactly to fp32)"
        )
    checkpoint = checkpoint or ReleaseCheckpoint(folder)
    model = meta_model(checkpoint, dtype)
    start = time.perf_counter()
    if decode:
        wrapper = dec.DecodeLM(model).eval()
        specs = with_precision(dec.input_specs(wrapper.lm), dtype)
        caches = dec.cache_specs(wrapper.lm)
        ids, mask, positions, *past = dec.example_inputs(wrapper)
        # on meta like the weights: a cache on cpu meeting a meta projection is a device error
        example = tuple(t.to("meta") for t in (ids, mask, positions)) + tuple(
            t.to("meta", TORCH_DTYPES[dtype]) for t in past
        )
        names, max_seq, prefix = ["logits", *(c.output for c in caches)], wrapper.lm.config.max_len, "lm."
        program = trace(
            wrapper, example, specs, output_names=names, opset=opset, max_seq=max_seq,
            dynamic_shapes=dec._dynamic_shapes(specs), optimize=False,
        )  # fmt: skip
    else:
        source = from_module(model)
        specs = with_precision(source.specs, dtype)
        example = tuple(torch.from_numpy(a) for a in random_inputs(specs, batch, seq, pad=False).values())
        names, max_seq, prefix = source.output_names, source.max_seq, ""
        program = trace(model, example, specs, output_names=names, opset=opset, max_seq=max_seq, optimize=False)
    graph = program.model
    attach_weights(graph.graph, checkpoint, dtype, prefix)
    optimize_streamed(graph)
    with _stubbed(graph) as streamed:
        proto = ir.serde.serialize_model(graph)
    proto = finish_proto(proto, specs, max_seq=max_seq)
    if decode:
        dec._name_output_dims(proto, caches)
        props = {p.key: p.value for p in proto.metadata_props}
        props[dec.DECODE_KEY] = json.dumps(dec.decode_metadata(wrapper.lm))
        del proto.metadata_props[:]
        onnx.helper.set_model_props(proto, props)
    seconds = time.perf_counter() - start
    written = write_streamed(graph, proto, streamed, Path(path))
    return export_result(proto, written, specs, seconds)


__all__ = ["TORCH_DTYPES", "attach_weights", "export_streamed", "meta_model", "optimize_streamed"]
