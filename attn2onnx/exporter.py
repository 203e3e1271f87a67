"""PyTorch -> ONNX with the ``ai.attn2onnx`` op set.

``torch.onnx.export(dynamo=True)`` runs with a custom translation table that turns each
attn2onnx torch custom op into one bare ``ai.attn2onnx`` node; afterwards each op's
standard-op body is attached as an ONNX local function, so any runtime can run the model and
native kernels can replace the bodies. Dynamic dims are named ``batch`` and ``seq``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any, Sequence

import onnx
import torch

from . import custom_ops
from .io_spec import METADATA_KEY, InputSpec, specs_to_json
from .onnx_io import attach_functions, check_model, save_model
from .sources import eval_mode

DEFAULT_OPSET = 23
MAX_SEQ_KEY = "attn2onnx.max_seq"  # metadata: the longest sequence the model takes (run checks inputs against it)


@dataclass
class ExportResult:
    """What :func:`export` wrote and how the graph looks."""

    path: Path
    inputs: list[InputSpec]
    output_names: list[str]
    nodes: int
    custom_nodes: int
    seconds: float
    op_counts: dict[str, int] = field(default_factory=dict)


def _dynamic_shapes(specs: Sequence[InputSpec], max_seq: int | None) -> tuple[dict[int, Any], ...]:
    """dynamic_shapes for torch.onnx.export, one dict per input. Each symbolic dim is named
    (the name becomes the graph's dim_param; dims sharing a name are one dimension). With
    ``max_seq`` the sequence dim is declared as ``Dim("seq", max=max_seq)``; without, it is
    left to the model's own checks to bound."""
    dims: dict[str, Any] = {"batch": "batch", "seq": torch.export.Dim("seq", max=max_seq) if max_seq else "seq"}
    return tuple({i: dims.get(d, d) for i, d in enumerate(spec.dims) if isinstance(d, str)} for spec in specs)


@contextlib.contextmanager
def _quiet():
    """The exporter prints progress lines and warnings; keep the CLI output to our table."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def to_onnx(
    model: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor],
    specs: Sequence[InputSpec],
    *,
    output_names: Sequence[str] = ("output",),
    opset: int = DEFAULT_OPSET,
    max_seq: int | None = None,
    custom: bool = True,
) -> onnx.ModelProto:
    """Export ``model`` to an in-memory ModelProto with bare ai.attn2onnx nodes and their bodies.

    ``custom=False`` is the stock path: our ops are decomposed into the aten ops of their
    references first, which is what plain ``torch.onnx.export`` makes of the same model
    written without attn2onnx.
    """
    eval_mode(model)
    dynamic = any(isinstance(d, str) for s in specs for d in s.dims)
    dynamic_shapes = _dynamic_shapes(specs, max_seq) if dynamic else None
    with _quiet():
        target: Any = model
        if not custom:
            dims = tuple({i: torch.export.Dim.DYNAMIC for i in d} for d in dynamic_shapes) if dynamic_shapes else None
            program = torch.export.export(model, tuple(example_inputs), dynamic_shapes=dims, strict=False)
            target = program.run_decompositions(custom_ops.decompositions())
        program = torch.onnx.export(
            target,
            tuple(example_inputs),
            dynamo=True,
            opset_version=opset,
            input_names=[s.name for s in specs],
            output_names=list(output_names),
            dynamic_shapes=dynamic_shapes if custom else None,
            custom_translation_table=custom_ops.translation_table() if custom else None,
            optimize=True,
            verbose=False,
        )
    proto = program.model_proto
    if custom:
        attach_functions(proto)
    props = {METADATA_KEY: specs_to_json(specs), "attn2onnx.version": package_version("attn2onnx")}
    onnx.helper.set_model_props(proto, {**props, MAX_SEQ_KEY: str(max_seq)} if max_seq else props)
    return proto


def export(
    model: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor],
    path: str | os.PathLike,
    *,
    specs: Sequence[InputSpec] | None = None,
    output_names: Sequence[str] = ("output",),
    opset: int = DEFAULT_OPSET,
    dynamic: bool = True,
    max_seq: int | None = None,
) -> ExportResult:
    """Export ``model`` to ``path`` and check it with ``onnx.checker`` (full_check) before it
    replaces anything there (:func:`attn2onnx.onnx_io.save_model`: atomic, external data past
    2 GB); a model that fails the check raises and leaves the old file as it was. The model
    exports in its own precision (``model.half()`` gives an fp16 graph). Parity with PyTorch is checked by the caller
    (:func:`attn2onnx.validate.compare`), which the CLI does right after export."""
    from .io_spec import specs_from_examples

    if specs is None:
        specs = specs_from_examples([f"input_{i}" for i in range(len(example_inputs))], example_inputs, dynamic)
    if not dynamic:
        specs = [dataclasses.replace(s, dims=tuple(example_inputs[i].shape)) for i, s in enumerate(specs)]
    start = time.perf_counter()
    proto = to_onnx(model, example_inputs, specs, output_names=output_names, opset=opset, max_seq=max_seq)
    seconds = time.perf_counter() - start
    path = save_model(proto, path, check=check_model)  # checked as a temporary: a failure keeps the old file
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        key = node.op_type if not node.domain else f"{node.domain}::{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return ExportResult(
        path=path,
        inputs=list(specs),
        output_names=[o.name for o in proto.graph.output],
        nodes=len(proto.graph.node),
        custom_nodes=sum(1 for n in proto.graph.node if n.domain == custom_ops.DOMAIN),
        seconds=seconds,
        op_counts=counts,
    )
