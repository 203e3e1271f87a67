"""PyTorch -> ONNX with the ``ai.attn2onnx`` op set.

``torch.onnx.export(dynamo=True)`` runs with a custom translation table that turns each
attn2onnx torch custom op into one bare ``ai.attn2onnx`` node; afterwards each op's
standard-op body is attached as an ONNX local function, so any runtime can run the model and
native kernels can replace the bodies. Dynamic dims are named ``batch`` and ``seq``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import logging
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any, Sequence

import onnx
import torch

from . import custom_ops
from .errors import UsageError
from .graph_format import MAX_SEQ_KEY
from .io_spec import METADATA_KEY, DynamicShapeError, InputSpec, specs_to_json
from .onnx_io import attach_functions, check_model, save_model
from .sources import default_output_names, eval_mode

DEFAULT_OPSET = 23


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


def _input_names(model: torch.nn.Module, names: Sequence[str]) -> list[str]:
    """The names torch gives the inputs (``forward``'s parameters), in order; ``names`` where
    the signature does not say (``*args``)."""
    try:
        params = [
            p
            for p in inspect.signature(model.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        params = []
    return [params[i].name if i < len(params) else name for i, name in enumerate(names)]


def _marked_dims(model: torch.nn.Module, input_names: Sequence[str], dynamic_shapes: Any) -> list[frozenset[int]]:
    """Per input, the dims that ``dynamic_shapes`` (torch.export's convention: a tuple/list in
    input order or a dict keyed by ``forward``'s parameter names; per input None, a dict
    dim -> Dim / str / hint, or a list per dim) makes dynamic. None, ints and Dim.STATIC are static."""
    n = len(input_names)
    if isinstance(dynamic_shapes, dict):
        names = _input_names(model, input_names)
        unknown = sorted(set(dynamic_shapes) - set(names))
        if unknown:
            raise DynamicShapeError(
                f"dynamic_shapes names {', '.join(map(repr, unknown))}, not inputs of the model ({', '.join(names)})"
            )
        per_input = [dynamic_shapes.get(name) for name in names]
    elif isinstance(dynamic_shapes, (tuple, list)) and len(dynamic_shapes) == n:
        per_input = list(dynamic_shapes)
    else:
        raise DynamicShapeError(
            f"dynamic_shapes must be a tuple of {n} entries (one per example input) or a dict "
            "keyed by the forward parameters' names"
        )
    marked = []
    for entry in per_input:
        dims = entry.items() if isinstance(entry, dict) else enumerate(entry or ())
        marked.append(
            frozenset(
                i for i, d in dims if d is not None and not isinstance(d, int) and d is not torch.export.Dim.STATIC
            )
        )
    return marked


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_SPECIALISED = (  # torch's ways of saying that tracing fixed a dim marked dynamic (inferred size or guard)
    re.compile(
        r"inferred a static shape of (?P<size>\d+) for dimension "
        r"inputs\['(?P<input>\w+)'\]\.shape\[(?P<dim>\d+)\]"
    ),
    re.compile(
        r"You marked L\['(?P<input>\w+)'\]\.size\(\)\[(?P<dim>\d+)\] as dynamic but your code specialized "
        r"it to be a constant \((?P<size>\d+)\)"
    ),
    re.compile(
        r"Not all values of (?P<symbol>\w+) = L\['(?P<input>\w+)'\]\.size\(\)\[(?P<dim>\d+)\] in the "
        r"specified range .*? satisfy the generated guard (?P<guard>[^\n]+)"
    ),
)
_RELATED = (  # torch's ways of saying that dims given different dynamic dims must be equal
    re.compile(r"The size of tensor a \(s\d+\) must match the size of tensor b \(s\d+\)[^\n)]*"),
    re.compile(r"Guard failed: [^\n]+"),
)


def _specialised(label: str, dim: int | str, inferred: str) -> DynamicShapeError:
    return DynamicShapeError(
        f"input {label} dim {dim} cannot stay dynamic: torch inferred {inferred} from the model; export with "
        "dynamic=False (CLI: --static), or pass dynamic_shapes with that dim static"
    )


class ExportError(UsageError):
    """torch could not trace or translate the model (code torch.export does not follow, an op
    without an ONNX translation): one line with torch's own reason; ATTN2ONNX_DEBUG=1 re-raises
    torch's error with its trace."""


def _trace_error(err: BaseException) -> ExportError:
    """The one-line error for any other export failure: the innermost cause's first line."""
    reasons, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        lines = [line.strip() for line in _ANSI.sub("", str(err)).splitlines() if line.strip()]
        if lines:  # a first line that announces a list ("...found:") says nothing without the list's head
            head = " ".join(lines[:2]) if lines[0].endswith(":") and len(lines) > 1 else lines[0]
            reasons.append(f"{type(err).__name__}: {head}")
        err = err.__cause__ or err.__context__
    reason = reasons[-1] if reasons else "unknown error"
    return ExportError(f"torch could not export the model ({reason}); ATTN2ONNX_DEBUG=1 shows torch's trace")


def _shape_error(err: BaseException, model: torch.nn.Module, specs: Sequence[InputSpec]) -> DynamicShapeError | None:
    """The one-line error for a torch export failure about dynamic dims; None for any other failure."""
    text, seen = "", set()
    while err is not None and id(err) not in seen:  # torch.onnx wraps torch.export's error
        seen.add(id(err))
        text += "\n" + _ANSI.sub("", str(err))
        err = err.__cause__ or err.__context__
    labels = {
        torch_name: (repr(torch_name) if torch_name == s.name else f"{torch_name!r} ({s.name})")
        for torch_name, s in zip(_input_names(model, [s.name for s in specs]), specs)
    }
    for pattern in _SPECIALISED:
        found = pattern.search(text)
        if found is None:
            continue
        label = labels.get(found["input"], repr(found["input"]))
        if "size" in found.groupdict():
            return _specialised(label, found["dim"], f"the static size {found['size']}")
        fix = re.search(rf"Suggested fixes:\s+{found['symbol']} = (\d+)", text)
        inferred = f"the static size {fix[1]}" if fix else f"the guard {found['guard'].strip()}"
        return _specialised(label, found["dim"], inferred)
    for pattern in _RELATED:
        found = pattern.search(text)
        if found:
            return DynamicShapeError(
                f"the model relates dims that were given different dynamic dims ({found[0].strip()}); give them "
                "one name in dynamic_shapes, or export with dynamic=False (CLI: --static)"
            )
    return None


def _check_dynamic_dims(proto: onnx.ModelProto, specs: Sequence[InputSpec]) -> None:
    """Raise when a dim the specs call dynamic came out fixed in the graph (torch.onnx.export
    may specialise a named Dim without a word): the file would not take other sizes."""
    graph_inputs = {v.name: v.type.tensor_type.shape.dim for v in proto.graph.input}
    for spec in specs:
        for j, (want, got) in enumerate(zip(spec.dims, graph_inputs.get(spec.name, ()))):
            if isinstance(want, str) and got.HasField("dim_value"):
                raise _specialised(repr(spec.name), j, f"the static size {got.dim_value}")


@contextlib.contextmanager
def _quiet():
    """The exporter prints progress lines, warnings and, when tracing fails, error logs with
    tracebacks; keep the CLI output to our table and our one-line errors."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _name_outputs(outputs: Sequence[Any], names: Sequence[str] | None) -> None:
    """Give the graph's outputs (onnx_ir values) ``names``, one per output, or without names
    :func:`~attn2onnx.sources.default_output_names` (torch would name the outputs after its
    nodes, ``sum_1``); names that do not count the outputs are an :class:`ExportError`."""
    if names is None:
        for value, name in zip(outputs, default_output_names(len(outputs))):
            value.name = name
    elif len(names) != len(outputs):
        raise ExportError(
            f"the model gives {len(outputs)} outputs but output_names names {len(names)} ({', '.join(names)}); "
            "name each output once"
        )


def to_onnx(
    model: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor],
    specs: Sequence[InputSpec],
    *,
    output_names: Sequence[str] | None = None,
    opset: int = DEFAULT_OPSET,
    max_seq: int | None = None,
    custom: bool = True,
    dynamic_shapes: Any = None,
) -> onnx.ModelProto:
    """Export ``model`` to an in-memory ModelProto with bare ai.attn2onnx nodes and their bodies
    (:func:`trace`, then :func:`finish_proto`)."""
    program = trace(
        model,
        example_inputs,
        specs,
        output_names=output_names,
        opset=opset,
        max_seq=max_seq,
        custom=custom,
        dynamic_shapes=dynamic_shapes,
    )
    return finish_proto(program.model_proto, specs, custom=custom, max_seq=max_seq)


def finish_proto(
    proto: onnx.ModelProto, specs: Sequence[InputSpec], *, custom: bool = True, max_seq: int | None = None
) -> onnx.ModelProto:
    """The exported graph's last steps on its proto: dynamic dims checked, op bodies attached,
    the input specs (and ``max_seq``) as metadata."""
    _check_dynamic_dims(proto, specs)
    if custom:
        attach_functions(proto)
    props = {METADATA_KEY: specs_to_json(specs), "attn2onnx.version": package_version("attn2onnx")}
    onnx.helper.set_model_props(proto, {**props, MAX_SEQ_KEY: str(max_seq)} if max_seq else props)
    return proto


def trace(
    model: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor],
    specs: Sequence[InputSpec],
    *,
    output_names: Sequence[str] | None = None,
    opset: int = DEFAULT_OPSET,
    max_seq: int | None = None,
    custom: bool = True,
    dynamic_shapes: Any = None,
    optimize: bool = True,
) -> Any:
    """Export ``model`` with torch's dynamo exporter; the ONNXProgram (``.model``: onnx_ir).

    ``custom=False`` is the stock path: our ops are decomposed into the aten ops of their
    references first, which is what plain ``torch.onnx.export`` makes of the same model
    written without attn2onnx. ``dynamic_shapes`` (torch.export's convention) goes to torch
    as given; without it the dynamic dims are those of ``specs``. A dim that torch specialises
    is a one-line :class:`DynamicShapeError`. The graph is legalised right after export
    (:mod:`attn2onnx.passes.legalize`: int32 indices cast to int64), so ONNX Runtime loads it.
    ``optimize=False`` skips torch's constant folding and fusions (and the legalisation): the
    streaming export (:mod:`attn2onnx.streaming.export`) traces a model on the ``meta`` device,
    whose weights cannot be folded until they are read, and runs both itself.
    """
    from .passes.legalize import legalize

    eval_mode(model)
    derived = None
    if dynamic_shapes is None and any(isinstance(d, str) for s in specs for d in s.dims):
        derived = _dynamic_shapes(specs, max_seq)
    try:
        with _quiet():
            target: Any = model
            if not custom:
                dims = dynamic_shapes
                if derived:
                    dims = tuple({i: torch.export.Dim.DYNAMIC for i in d} for d in derived)
                program = torch.export.export(model, tuple(example_inputs), dynamic_shapes=dims, strict=False)
                target = program.run_decompositions(custom_ops.decompositions())
            program = torch.onnx.export(
                target,
                tuple(example_inputs),
                dynamo=True,
                opset_version=opset,
                input_names=[s.name for s in specs],
                output_names=list(output_names) if output_names else None,
                dynamic_shapes=(derived if dynamic_shapes is None else dynamic_shapes) if custom else None,
                custom_translation_table=custom_ops.translation_table() if custom else None,
                optimize=optimize,
                verbose=False,
            )
    except Exception as err:  # noqa: BLE001 - torch wraps its dim errors in several types
        if os.environ.get("ATTN2ONNX_DEBUG"):
            raise
        raise (_shape_error(err, model, specs) or _trace_error(err)) from None
    _name_outputs(program.model.graph.outputs, output_names)
    if optimize:
        legalize(program.model)
    return program


def export(
    model: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor],
    path: str | os.PathLike,
    *,
    specs: Sequence[InputSpec] | None = None,
    output_names: Sequence[str] | None = None,
    opset: int = DEFAULT_OPSET,
    dynamic: bool = True,
    max_seq: int | None = None,
    dynamic_shapes: Any = None,
) -> ExportResult:
    """Export ``model`` to ``path`` and check it with ``onnx.checker`` (full_check) before it
    replaces anything there (:func:`attn2onnx.onnx_io.save_model`: atomic, external data past
    2 GB); a model that fails the check raises and leaves the old file as it was. The model
    exports in its own precision (``model.half()`` gives an fp16 graph). Parity with PyTorch is checked by the caller
    (:func:`attn2onnx.validate.compare`), which the CLI does right after export.

    Dynamic dims: ``dynamic_shapes`` in torch.export's convention goes to torch as given (the
    specs, unless given, name its dynamic dims batch or seq by size); without it they are
    inferred from the example inputs' sizes (:func:`attn2onnx.io_spec.specs_from_examples`).
    ``dynamic=False`` fixes every dim. A dim that torch specialises is a one-line
    :class:`~attn2onnx.io_spec.DynamicShapeError`."""
    from .io_spec import specs_from_examples

    if dynamic_shapes is not None and not dynamic:
        raise UsageError("dynamic_shapes and dynamic=False contradict each other; pass one of them")
    if specs is None:
        names = [f"input_{i}" for i in range(len(example_inputs))]
        marked = None if dynamic_shapes is None else _marked_dims(model, names, dynamic_shapes)
        specs = specs_from_examples(names, example_inputs, dynamic, marked)
    if not dynamic:
        specs = [dataclasses.replace(s, dims=tuple(example_inputs[i].shape)) for i, s in enumerate(specs)]
    start = time.perf_counter()
    proto = to_onnx(
        model,
        example_inputs,
        specs,
        output_names=output_names,
        opset=opset,
        max_seq=max_seq,
        dynamic_shapes=dynamic_shapes,
    )
    seconds = time.perf_counter() - start
    path = save_model(proto, path, check=check_model)  # checked as a temporary: a failure keeps the old file
    return export_result(proto, path, specs, seconds)


def export_result(proto: onnx.ModelProto, path: str, specs: Sequence[InputSpec], seconds: float) -> ExportResult:
    """What an export wrote at ``path`` (``proto``'s graph): inputs, outputs, node counts by op."""
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
