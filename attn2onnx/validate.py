"""Parity of an exported model with PyTorch, through Polygraphy.

A :class:`TorchRunner` (the PyTorch reference) and Polygraphy's ``OnnxrtRunner`` (built from
our session callable, so native kernels are registered) — plus ``TrtRunner`` where TensorRT
exists — run the same fresh random inputs at several dynamic shapes (or the saved ones of
:mod:`attn2onnx.input_cases`); every output is judged by Polygraphy's simple compare function
under a :class:`~attn2onnx.tolerances.Tolerance` (per-dtype atol / rtol, overridable, and an
error statistic), which the report carries. NaN never passes.

:func:`check_parity` is the whole check as one call -- what ``attn2onnx validate``, ``export``
and ``demo`` run and print -- returning a :class:`ParityReport`; with ``decode=True`` it checks
a decode graph (prefill + decode steps) instead.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence, Union

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.backend.onnxrt import OnnxrtRunner
from polygraphy.common import TensorMetadata
from polygraphy.comparator import Comparator
from polygraphy.datatype import DataType
from polygraphy.logger import G_LOGGER

from .errors import UsageError
from .input_cases import check_cases, check_decode_cases
from .io_spec import InputSpec, describe_fixed, describe_inputs, fixed_sizes, random_inputs, reference_input
from .runtime.metadata import DecodeMeta
from .sources import ModelSource, eval_mode
from .tolerances import (
    REFERENCE_ERROR_FACTOR,
    TOLERANCES,
    OutputError,
    Tolerance,
    judge,
    quantized_tolerance,
    reference_error,
    tolerance,
    within_reference_error,
)

DEFAULT_SHAPES = ((1, 5), (2, 16), (3, 33))


def input_metadata(specs: Sequence[InputSpec]) -> TensorMetadata:
    """Polygraphy's view of the specs (dynamic dims as -1)."""
    meta = TensorMetadata()
    for spec in specs:
        shape = [d if isinstance(d, int) else -1 for d in spec.dims]
        meta.add(spec.name, dtype=DataType.from_dtype(spec.numpy_dtype), shape=shape)
    return meta


class TorchRunner(BaseRunner):
    """Polygraphy runner for the PyTorch reference: feeds by name in ``specs`` order."""

    def __init__(
        self, model: torch.nn.Module, specs: Sequence[InputSpec], output_names: Sequence[str], name: str = "pytorch"
    ):
        super().__init__(name=name, prefix="pytorch-runner")
        self.model = eval_mode(model)
        self.specs = list(specs)
        self.output_names = list(output_names)

    def activate_impl(self) -> None:
        pass

    def get_input_metadata_impl(self) -> TensorMetadata:
        return input_metadata(self.specs)

    def infer_impl(self, feed_dict: dict) -> OrderedDict:
        args = [torch.from_numpy(np.asarray(feed_dict[s.name])) for s in self.specs]
        args = [a.float() if a.is_floating_point() else a for a in args]
        start = time.perf_counter()
        with torch.inference_mode():
            outputs = self.model(*args)
        self.inference_time = time.perf_counter() - start  # Polygraphy sums runner times
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        return OrderedDict((n, o.float().numpy()) for n, o in zip(self.output_names, outputs))

    def float64_outputs(self, feed_dict: dict) -> OrderedDict | None:
        """The outputs of a float64 copy of the model on ``feed_dict`` (floats widened), the
        truth the fp32 run is judged against where the model is ill-conditioned; None when the
        model cannot run in float64."""
        if not hasattr(self, "_model64"):
            self._model64 = copy.deepcopy(self.model).double()
        args = [torch.from_numpy(np.asarray(feed_dict[s.name])) for s in self.specs]
        args = [a.double() if a.is_floating_point() else a for a in args]
        try:
            with torch.inference_mode():
                outputs = self._model64(*args)
        except (RuntimeError, TypeError, NotImplementedError):
            return None
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        return OrderedDict((n, o.double().numpy()) for n, o in zip(self.output_names, outputs))

    def deactivate_impl(self) -> None:
        pass


@dataclass
class Float64Check:
    """Where an fp32 comparison missed the rule: the backend's and the fp32 reference's largest
    distance from a float64 run of the reference (tolerances.within_reference_error)."""

    backend_err: float
    reference_err: float

    def __str__(self) -> str:
        return (
            f"vs float64: {self.backend_err:.2e}, PyTorch fp32's own {self.reference_err:.2e} "
            f"(ill-conditioned input; allowed: the rule + {REFERENCE_ERROR_FACTOR:g}x PyTorch's own)"
        )


@dataclass
class Comparison:
    """One backend at one shape, as in ``validate --json``: the max errors over every output
    (relative to max(|want|, atol)), the verdict, and each output under the report's rule; an
    fp32 comparison that missed the rule and was judged against float64 instead carries
    ``float64`` (its verdict is then that judgement)."""

    backend: str
    shape: list[int]
    max_abs_err: float
    max_rel_err: float
    passed: bool
    outputs: list[OutputError] = field(default_factory=list)
    float64: Float64Check | None = None


def _errors(got: np.ndarray, want: np.ndarray, atol: float) -> tuple[float, float]:
    """Max absolute error and max relative error (|got-want| / max(|want|, atol), atol at least
    float64's epsilon, as Polygraphy lifts a zero ``want``)."""
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    if diff.size == 0:
        return 0.0, 0.0
    rel = diff / np.maximum(np.abs(want.astype(np.float64)), max(atol, np.finfo(np.float64).eps))
    return float(diff.max()), float(rel.max())  # NaN propagates: it never passes


def random_cases(specs: Sequence[InputSpec], shapes: Sequence[tuple[int, int]], seed: int = 0) -> list[dict]:
    """Fresh random inputs per (batch, seq) shape, case ``i`` from ``seed + i`` (float inputs at
    the specs' precision)."""
    return [random_inputs(specs, batch, seq, seed=seed + i) for i, (batch, seq) in enumerate(shapes)]


def _comparison(backend: str, shape: list[int], got: dict, want: dict, rule: Tolerance) -> Comparison:
    """``got`` against the reference's ``want`` (outputs by name) under ``rule``."""
    outputs = judge(got, want, rule)
    errors = [_errors(np.asarray(got[name]), np.asarray(w), rule.atol) for name, w in want.items()]
    abs_err = max((a for a, _ in errors), default=0.0)
    rel_err = max((r for _, r in errors), default=0.0)
    return Comparison(backend, shape, abs_err, rel_err, all(o.passed for o in outputs), outputs)


def _judged_against_float64(comparison: Comparison, got: dict, want: dict, want64: dict, rule: Tolerance) -> None:
    """Re-judge a failed fp32 ``comparison`` against the float64 outputs ``want64``: it passes
    when ``got`` is within the rule plus the fp32 reference's own error of float64."""
    comparison.float64 = Float64Check(reference_error(got, want64), reference_error(want, want64))
    comparison.passed = within_reference_error(got, want, want64, rule)


def compare(
    reference: BaseRunner,
    backends: dict[str, BaseRunner],
    specs: Sequence[InputSpec],
    shapes: Sequence[tuple[int, int]] = DEFAULT_SHAPES,
    dtype: str = "fp32",
    seed: int = 0,
    *,
    rule: Tolerance | None = None,
    feeds: Sequence[dict] | None = None,
    progress: Any = None,
) -> list[Comparison]:
    """Run the reference and every backend on ``feeds`` (one dict per case; default
    :func:`random_cases` at ``shapes``) and judge every output under ``rule`` (default
    ``dtype``'s tolerances). ``specs`` are the backends' inputs (fp16 float inputs for an fp16
    model); the reference runner computes in fp32 whatever it is fed. ``progress``
    (attn2onnx.progress.Progress) shows a bar over the cases."""
    rule = rule or tolerance(dtype)
    G_LOGGER.module_severity = G_LOGGER.CRITICAL  # our table reports; Polygraphy's own logs would mix into --json
    results = []
    cases = list(random_cases(specs, shapes, seed) if feeds is None else feeds)
    for case in cases if progress is None else progress.iterate(cases, "parity cases", unit="case"):
        run_results = Comparator.run([reference, *backends.values()], data_loader=[case])
        want = run_results[reference.name][0]
        want64 = None
        for name, runner in backends.items():
            got = run_results[runner.name][0]
            comparison = _comparison(name, fed_shape(specs, case), got, want, rule)
            if not comparison.passed and rule.dtype == "fp32" and isinstance(reference, TorchRunner):
                want64 = want64 or reference.float64_outputs(case)
                if want64 is not None:
                    _judged_against_float64(comparison, got, want, want64, rule)
            results.append(comparison)
    return results


def left_padded(rng: np.random.Generator, batch: int, prompt: int, total: int, vocab: int) -> tuple[np.ndarray, ...]:
    """Random ids [batch, total] and their attention mask (int64, 1 = real): row r is padded on
    the left by r * prompt // batch positions, so rows start their prompts at different points
    and every prompt keeps at least one real token."""
    ids = rng.integers(0, vocab, size=(batch, total), dtype=np.int64)
    mask = np.ones((batch, total), dtype=np.int64)
    for row in range(batch):
        mask[row, : row * prompt // batch] = 0
    return ids, mask


def decode_cases(meta: DecodeMeta, steps: int) -> list[tuple[int, int]]:
    """Default (batch, prompt length) pairs for validate --decode: batch 1 and 3 at short and
    longer prompts and, for a model with local-window layers, prompts that end just before and
    at each window limit so the decode steps cross it; all within max_len."""
    prompts = {1, 5, 9}
    for cache in meta.caches:
        if cache.limit:
            prompts |= {max(cache.limit - 1, 1), cache.limit + 1}
    fits = sorted(p for p in prompts if p + steps <= meta.max_len)
    if not fits:
        raise UsageError(
            f"--steps {steps} leaves no room for a prompt within the model's max_len {meta.max_len}: "
            f"use at most {meta.max_len - 1} steps"
        )
    return [(1, fits[0])] + [(3, p) for p in fits]


def decode_feeds(vocab: int, cases: Sequence[tuple[int, int]], steps: int, seed: int = 0) -> list[dict]:
    """The inputs of each decode case (batch, prompt length) over prompt + ``steps`` positions:
    :func:`left_padded` ids and mask, the padded index as positions, and the prompt length
    (input_cases.PROMPT)."""
    from .input_cases import PROMPT

    rng = np.random.default_rng(seed)
    feeds = []
    for batch, prompt in cases:
        total = prompt + steps
        ids, mask = left_padded(rng, batch, prompt, total, vocab)
        positions = np.broadcast_to(np.arange(total), (batch, total)).copy()
        feeds.append({"input_ids": ids, "attention_mask": mask, "position_ids": positions, PROMPT: np.int64(prompt)})
    return feeds


def compare_decode(
    onnx_path: str,
    model: torch.nn.Module,
    cases: Sequence[tuple[int, int]],
    steps: int,
    dtype: str = "fp32",
    seed: int = 0,
    *,
    rule: Tolerance | None = None,
    feeds: Sequence[dict] | None = None,
) -> list[Comparison]:
    """Prefill + decode steps of the decode graph in ORT against the PyTorch full-sequence
    forward of the same left-padded batch, row by row (the real positions; a padded query row's
    output is no token's), judged under ``rule`` (default ``dtype``'s tolerances). ``feeds``:
    one :func:`decode_feeds` dict per case (default: drawn for ``cases``, (batch, prompt
    length), each with ``steps`` steps). Positions are the padded index, as the full forward
    computes them."""
    from .generate import DecodeSession
    from .input_cases import PROMPT

    rule = rule or tolerance(dtype)
    session = DecodeSession(onnx_path)
    model = eval_mode(model)
    results = []
    for case in decode_feeds(session.vocab_size, cases, steps, seed) if feeds is None else feeds:
        ids, mask, positions = case["input_ids"], case["attention_mask"], case["position_ids"]
        (batch, total), prompt = ids.shape, int(case[PROMPT])
        with torch.inference_mode():
            want = model(torch.from_numpy(ids), torch.from_numpy(mask).bool()).float().numpy()
        rows = [session.prefill(ids[:, :prompt], mask[:, :prompt], positions[:, :prompt])]
        for t in range(prompt, total):
            rows.append(session.step(ids[:, t : t + 1], mask[:, : t + 1], positions[:, t : t + 1]))
        got = np.concatenate(rows, axis=1)[mask.astype(bool)]
        want = want[mask.astype(bool)]
        results.append(
            _comparison("ort-decode", [batch, prompt, total - prompt], {"logits": got}, {"logits": want}, rule)
        )
    return results


def ort_runner(onnx_path: str, name: str = "onnxruntime", threads: int | None = None) -> OnnxrtRunner:
    """OnnxrtRunner whose session comes from :func:`attn2onnx.runtime.session` (native kernel
    library registered when built; Polygraphy's own loader has no hook for it)."""
    from .runtime import session

    return OnnxrtRunner(lambda: session(onnx_path, backend="ort", threads=threads), name=name)


def backend_runners(
    onnx_path: str, backends: Sequence[str], specs: Sequence[InputSpec], shapes: Sequence[tuple[int, int]]
) -> dict[str, BaseRunner]:
    """Runner per backend name (``ort``, ``trt``); unknown names, or TensorRT where it is not
    installed, are usage errors (exit 2) before anything runs."""
    runners: dict[str, BaseRunner] = {}
    for backend in backends:
        if backend == "ort":
            runners[backend] = ort_runner(onnx_path)
        elif backend == "trt":
            from functools import partial

            from .runtime.tensorrt import TrtRunner, engine_for_shapes, require_tensorrt

            require_tensorrt()  # TensorRTUnavailable (a UsageError) where it is missing
            runners[backend] = TrtRunner(partial(engine_for_shapes, onnx_path, list(shapes)), input_metadata(specs))
        else:
            raise UsageError(f"unknown backend {backend!r}; choose from ort, trt")
    return runners


@dataclass
class ParityReport:
    """What :func:`check_parity` found: one :class:`Comparison` per backend and shape."""

    comparisons: list[Comparison]
    fixed: dict[str, int] = field(default_factory=dict)  # sizes the graph fixes: {"batch": 1, "seq": 32}
    inputs: list[str] = field(default_factory=list)  # what was drawn per input (io_spec.describe_inputs)
    rule: Tolerance | None = None  # what each output was judged by
    fed: list[dict] = field(default_factory=list, repr=False, compare=False)  # each case's inputs (input_cases)
    reference: str | None = None  # a large release folder's reference dtype: fp32, or bf16 where fp32 does not fit

    @property
    def passed(self) -> bool:
        """True when there was something to compare and every comparison passed."""
        return bool(self.comparisons) and all(c.passed for c in self.comparisons)

    def to_dict(self) -> dict[str, Any]:
        """The ``validate --json`` object: {"passed", "comparisons": [{"backend", "shape", ...,
        "outputs": [{"name", "abs_err", "rel_err", "passed"}], "float64": null or {"backend_err",
        "reference_err"}}], "fixed", "inputs", "tolerance":
        {"dtype", "atol", "rtol", "stat"}}."""
        return {
            "passed": self.passed,
            "comparisons": [asdict(c) for c in self.comparisons],
            "fixed": self.fixed,
            "inputs": self.inputs,
            "tolerance": asdict(self.rule) if self.rule else None,
            "reference": self.reference,
        }

    def to_json(self) -> str:
        """:meth:`to_dict` as one line of JSON."""
        return json.dumps(self.to_dict())


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"1x5,2x16"`` -> [(1, 5), (2, 16)], as batch x sequence length."""
    shapes = []
    for item in text.split(","):
        try:
            batch, seq = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise UsageError(f"bad shape {item!r}: expected BATCHxSEQ, e.g. 2x16") from None
        if batch < 1 or seq < 1:
            raise UsageError(f"bad shape {item!r}: sizes must be positive")
        shapes.append((batch, seq))
    return shapes


def fed_shape(specs: Sequence[InputSpec], feeds: dict[str, np.ndarray]) -> list[int]:
    """[batch, seq] as ``feeds`` have them (read off their reference input, :func:`reference_input`):
    the shape that ran, whatever was asked; [batch] for an image."""
    spec, sizes = reference_input(specs)
    return [int(d) for d in feeds[spec.name].shape[:sizes]] if spec else []


def runnable_shapes(
    specs: Sequence[InputSpec], shapes: Sequence[tuple[int, int]], requested: bool
) -> tuple[list[tuple[int, int]], dict[str, int]]:
    """The (batch, seq) shapes to run for ``shapes`` and the sizes the inputs fix: each shape as
    the inputs take it (a fixed size replaces the asked one; an image has no sequence), once.
    A ``requested`` shape (the user's) that the inputs cannot take is a UsageError, not a run
    at another shape reported as the asked one."""
    fixed = fixed_sizes(specs)
    spec, sizes = reference_input(specs)
    runs: dict[tuple[int, ...], tuple[int, int]] = {}
    for batch, seq in shapes:
        fed = spec.shape(batch, seq)[:sizes] if spec else ()
        if requested and list(fed) != [batch, seq][:sizes]:
            raise UsageError(
                f"the model has a {describe_fixed(fixed)} and cannot run at {batch}x{seq}; "
                "pass only shapes it takes, or none"
            )
        runs.setdefault(fed, (fed[0], fed[1]) if len(fed) == 2 else (batch, seq))
    return list(runs.values()), fixed


Reference = Union[str, "os.PathLike[str]", torch.nn.Module, ModelSource]


def float_precision(model) -> str | None:
    """``fp32`` / ``fp16`` from the ONNX model's float inputs and weights (None if it has neither)."""
    import onnx

    names = {onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16"}
    types = [v.type.tensor_type.elem_type for v in model.graph.input] + [i.data_type for i in model.graph.initializer]
    found = [names[t] for t in types if t in names]
    return found[0] if found else None


def reference_source(reference: Reference, trust_pickle: bool = False, trust_remote_code: bool = False) -> ModelSource:
    """The reference as a ModelSource: a model file (:func:`attn2onnx.sources.load_source`:
    .pt, .pt2, DCFormer or transformers folder; a pickle only with ``trust_pickle``, a folder's
    own modeling code only with ``trust_remote_code``), an attn2onnx model, or a ModelSource as
    it is."""
    from .sources import from_module, load_source

    if isinstance(reference, ModelSource):
        return reference
    if isinstance(reference, torch.nn.Module):
        return from_module(reference)
    return load_source(reference, trust_pickle=trust_pickle, trust_remote_code=trust_remote_code)


def check_reference(path: str, model, specs: list, source: ModelSource, shape: tuple[int, int]) -> None:
    """Refuse (UsageError) a reference that is not the model's, in one line, before comparing:
    inputs of another kind or rank, ids past the reference's vocabulary (known for attn2onnx
    models), or outputs whose names, ranks or fixed sizes differ from the ONNX graph's at
    ``shape`` (the reference runs once there). Otherwise the comparison itself fails on them
    with an IndexError or a broadcast ValueError."""
    vocab_known = hasattr(source.module, "config")
    for mine, ref in zip(specs, source.specs):
        if mine.kind != ref.kind or len(mine.dims) != len(ref.dims):
            raise UsageError(
                f"input {mine.name!r} of {path} is {mine.kind} {list(mine.dims)} "
                f"but the reference takes {ref.kind} {list(ref.dims)}"
            )
        if mine.kind == "ids" and vocab_known and mine.high > ref.high:
            raise UsageError(
                f"input {mine.name!r} of {path} takes ids in [0, {mine.high}) but the reference only in [0, {ref.high})"
            )
    names = [o.name for o in model.graph.output]
    if names != list(source.output_names):
        raise UsageError(f"{path} gives outputs {names} but the reference gives {list(source.output_names)}")
    batch, seq = shape
    outputs = TorchRunner(source.module, specs, source.output_names).infer_impl(random_inputs(specs, batch, seq))
    sizes = {"batch": batch, "seq": seq}
    for output in model.graph.output:
        if not output.type.tensor_type.HasField("shape"):
            continue
        dims = [
            sizes.get(d.dim_param, d.dim_param) if d.dim_param else d.dim_value
            for d in output.type.tensor_type.shape.dim
        ]
        got = list(outputs[output.name].shape)
        if len(dims) != len(got) or any(isinstance(d, int) and d and d != g for d, g in zip(dims, got)):
            raise UsageError(
                f"output {output.name!r} of {path} is {dims} at batch {batch} x seq {seq} but the "
                f"reference's is {got}: is --reference the model it was exported from?"
            )


def comparison_specs(path: str, model, source: ModelSource, precision: str | None) -> list[InputSpec]:
    """The inputs to feed: the specs our exports record (fixed dims of a --static export, id
    ranges), else the reference's at the file's precision with the sizes the graph fixes (a
    graph exported elsewhere with a static shape runs only there); the input names must agree."""
    import dataclasses

    from .io_spec import METADATA_KEY, specs_from_onnx, with_precision

    onnx_specs = specs_from_onnx(model)
    onnx_names = [s.name for s in onnx_specs]
    if onnx_names != [s.name for s in source.specs]:
        raise UsageError(f"{path} takes inputs {onnx_names} but the reference takes {[s.name for s in source.specs]}")
    if any(p.key == METADATA_KEY for p in model.metadata_props):
        return onnx_specs
    specs = with_precision(source.specs, precision or "fp32")
    for i, (spec, graph) in enumerate(zip(specs, onnx_specs)):
        if len(spec.dims) == len(graph.dims):
            dims = tuple(g if isinstance(g, int) and g > 0 else d for d, g in zip(spec.dims, graph.dims))
            specs[i] = dataclasses.replace(spec, dims=dims)
    return specs


def check_rule(path: str, model, dtype: str, atol: float | None, rtol: float | None, error_stat: str) -> Tolerance:
    """The rule to judge ``model`` by: ``dtype``'s tolerances on ``error_stat``, or for a graph
    ``attn2onnx quantize`` wrote, its recorded mode's (tolerances.quantized_tolerance: the
    relative RMS error), ``atol`` / ``rtol`` overriding either's defaults."""
    from .quantize import recorded_mode

    mode = recorded_mode(model)
    if mode is None:
        return tolerance(dtype, atol, rtol, error_stat)
    if error_stat != "elemwise":
        raise UsageError(
            f"{path} is quantized ({mode}): it is judged by the RMS error of its mode's tolerance, "
            "not by --check-error-stat"
        )
    return quantized_tolerance(mode, atol, rtol)


def check_parity(
    onnx_path: str | os.PathLike,
    reference: Reference,
    shapes: Sequence[tuple[int, int]] | None = None,
    backends: Sequence[str] = ("ort",),
    dtype: str = "fp32",
    *,
    seed: int = 0,
    trust_pickle: bool = False,
    trust_remote_code: bool = False,
    decode: bool = False,
    steps: int = 4,
    atol: float | None = None,
    rtol: float | None = None,
    error_stat: str = "elemwise",
    inputs: Sequence[dict[str, np.ndarray]] | None = None,
    progress: Any = None,
) -> ParityReport:
    """Compare the ONNX model at ``onnx_path`` with ``reference`` (a model file, an attn2onnx
    model or a ModelSource) on fresh random inputs at each (batch, seq) of ``shapes`` (default
    :data:`DEFAULT_SHAPES`, no longer than the model's maximum) in every backend (``ort``,
    ``trt``), judging every output by ``dtype``'s tolerances (``atol`` / ``rtol`` override
    them) on Polygraphy's ``error_stat`` (:mod:`attn2onnx.tolerances`), or a quantized graph
    by its mode's tolerance (:func:`check_rule`). ``inputs`` replays
    saved cases (:mod:`attn2onnx.input_cases`, the report's ``fed``) instead of ``shapes``.
    A graph with fixed sizes runs at them (:func:`runnable_shapes`; the report's ``fixed``
    says so); a shape in ``shapes`` it cannot take is a UsageError.

    With ``decode`` the file is a decode graph: prefill + ``steps`` decode steps in ORT against
    the full forward (see :func:`compare_decode`), ``shapes`` then being (batch, prompt length).
    Inputs that cannot be compared (another model, wrong precision, too long, too large, no
    or unknown backend, TensorRT missing) raise UsageError before anything runs. ``progress``
    (attn2onnx.progress.Progress) shows a bar over the cases compared."""
    from .commands import check_input_memory
    from .onnx_io import load_onnx

    path = os.fspath(onnx_path)
    model = load_onnx(path)
    precision = float_precision(model)
    if precision is not None and precision != dtype:
        raise UsageError(f"{path} computes in {precision}; --dtype {dtype} does not match it")
    rule = check_rule(path, model, dtype, atol, rtol, error_stat)
    if inputs is not None and shapes is not None:
        raise UsageError("saved inputs set the shapes they were saved at; give either inputs or shapes")
    source, reference_dtype = large_reference(reference, path, model)
    source = source or reference_source(reference, trust_pickle, trust_remote_code)
    if decode:
        report = decode_parity(path, model, source, shapes, backends, seed=seed, steps=steps, rule=rule, inputs=inputs)
        report.reference = reference_dtype
        return report
    specs = comparison_specs(path, model, source, precision)
    if inputs is not None:
        check_cases(specs, inputs)
        shapes = [tuple(fed_shape(specs, case) + [1])[:2] for case in inputs]  # (batch, seq); an image has no seq
    default = [source.fit(batch, seq) for batch, seq in DEFAULT_SHAPES]  # within the model's ranges
    shapes, fixed = runnable_shapes(specs, shapes or default, requested=shapes is not None)
    for batch, seq in shapes:
        source.check_shape(batch, seq)  # a program's Dim ranges, the model's max_seq
    if not backends:
        raise UsageError("no backend to compare; choose from ort, trt")
    check_input_memory(specs, shapes)
    check_reference(path, model, specs, source, shapes[0])
    runners = backend_runners(path, backends, specs, shapes)
    reference_runner = TorchRunner(source.module, specs, source.output_names)
    fed = list(inputs) if inputs is not None else random_cases(specs, shapes, seed)
    comparisons = compare(reference_runner, runners, specs, rule=rule, feeds=fed, progress=progress)
    drawn = describe_inputs(specs) if inputs is None else [f"{s.name}: the saved values" for s in specs]
    return ParityReport(comparisons, fixed, drawn, rule, fed, reference_dtype)


def large_reference(reference: Reference, path: str, model) -> tuple[ModelSource | None, str | None]:
    """For a release folder past the streaming size (:func:`attn2onnx.streaming.command.large_release`)
    the reference built in the dtype that fits beside the graph's session, float32 or else the
    release's bf16 (:func:`attn2onnx.streaming.reference.release_reference`), and that dtype;
    (None, None) for any other reference (loaded as :func:`reference_source` says)."""
    if not isinstance(reference, (str, os.PathLike)):
        return None, None
    from .onnx_io import model_files
    from .streaming.command import large_release

    if not large_release(reference):
        return None, None
    from .streaming.reference import release_reference

    graph_bytes = sum(f.stat().st_size for f in model_files(path, model))
    return release_reference(reference, graph_bytes)


def decode_parity(
    path: str,
    model,
    source: ModelSource,
    cases: Sequence[tuple[int, int]] | None,
    backends: Sequence[str],
    *,
    seed: int,
    steps: int,
    rule: Tolerance,
    inputs: Sequence[dict[str, np.ndarray]] | None = None,
) -> ParityReport:
    """check_parity(decode=True): the decode graph ``model`` (read from ``path``) against the
    causal LM of ``source``, at ``cases`` (batch, prompt length; default :func:`decode_cases`)
    or on the saved ``inputs``, judged under ``rule``."""
    from .models.decode import check_decodable
    from .runtime.metadata import require_decode

    meta = require_decode(model, path)
    lm = check_decodable(source.module)
    if lm.config.vocab_size != meta.vocab_size or lm.config.variant != meta.variant:
        raise UsageError(
            f"{path} is a decode graph of a {meta.variant} LM with vocabulary "
            f"{meta.vocab_size}, but the reference is a {lm.config.variant} LM with vocabulary "
            f"{lm.config.vocab_size}"
        )
    if list(backends) != ["ort"]:
        raise UsageError("--decode runs in ONNX Runtime only (--backends ort)")
    if inputs is not None:
        check_decode_cases(inputs, meta.vocab_size, meta.max_len)
        fed = list(inputs)
    else:
        cases = list(cases or decode_cases(meta, steps))
        too_long = [p for _, p in cases if p + steps > meta.max_len]
        if too_long:
            raise UsageError(f"prompt {too_long[0]} + {steps} steps exceeds the model's max_len {meta.max_len}")
        fed = decode_feeds(meta.vocab_size, cases, steps, seed)
    return ParityReport(compare_decode(path, lm, [], steps, rule=rule, feeds=fed), rule=rule, fed=fed)


def _greedy_choices(
    path: str | os.PathLike, prompts: Sequence[Sequence[int]], new_tokens: int, fed: list[list[int]] | None
) -> list[list[int]]:
    """The argmax token of the decode graph at ``path`` at each of ``new_tokens`` steps after
    each prompt, fed its own choices, or with ``fed`` the tokens given per prompt (teacher-forced)."""
    from .generate import DecodeSession, check_request

    session = DecodeSession(os.fspath(path))
    for prompt in prompts:
        check_request(session, prompt, new_tokens)
    choices = []
    for index, prompt in enumerate(prompts):
        logits = session.prefill(np.asarray([prompt], dtype=np.int64))[0, -1]
        picked = []
        for step in range(new_tokens):
            picked.append(int(logits.argmax()))
            if step + 1 < new_tokens:
                token = picked[-1] if fed is None else fed[index][step]
                logits = session.step(np.asarray([[token]], dtype=np.int64))[0, -1]
        choices.append(picked)
    return choices


def greedy_agreement(
    path: str | os.PathLike, baseline: str | os.PathLike, prompts: Sequence[Sequence[int]], new_tokens: int
) -> float:
    """The fraction of greedy decode steps at which the decode graph at ``path`` (a quantized
    one) picks the token the decode graph ``baseline`` (its fp32 original) picks, over every
    prompt of ``prompts`` and ``new_tokens`` steps each. Teacher-forced: both graphs are fed the
    baseline's tokens, so one early disagreement counts once, not for every step after it.
    The baseline runs first and is closed before the graph at ``path`` loads: one session in
    memory at a time (a 2.8B fp16 session alone holds ~12 GB). A prompt the graphs cannot take
    is a UsageError (generate.check_request)."""
    if not prompts:
        raise UsageError("greedy agreement needs at least one prompt")
    want = _greedy_choices(baseline, prompts, new_tokens, None)
    got = _greedy_choices(path, prompts, new_tokens, want)
    agreed = sum(a == b for mine, theirs in zip(got, want) for a, b in zip(mine, theirs))
    return agreed / (len(prompts) * new_tokens)


__all__ = [
    "TorchRunner",
    "Comparison",
    "ParityReport",
    "check_parity",
    "compare",
    "compare_decode",
    "decode_cases",
    "greedy_agreement",
    "ort_runner",
    "backend_runners",
    "parse_shapes",
    "TOLERANCES",
]
