"""Parity of an exported model with PyTorch, through Polygraphy.

A :class:`TorchRunner` (the PyTorch reference) and Polygraphy's ``OnnxrtRunner`` (built from
our session callable, so native kernels are registered) — plus ``TrtRunner`` where TensorRT
exists — run the same fresh random inputs at several dynamic shapes; Polygraphy's Comparator
checks every output with per-dtype tolerances. NaN never passes.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.backend.onnxrt import OnnxrtRunner
from polygraphy.common import TensorMetadata
from polygraphy.comparator import Comparator, SimpleCompareFunc
from polygraphy.datatype import DataType
from polygraphy.logger import G_LOGGER

from .errors import UsageError
from .io_spec import InputSpec, random_inputs
from .sources import eval_mode

# (rtol, atol) per dtype: an element passes when within atol absolutely or rtol relatively.
TOLERANCES = {"fp32": (1e-5, 1e-5), "fp16": (1e-2, 1e-2), "bf16": (2e-2, 2e-2)}
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

    def __init__(self, model: torch.nn.Module, specs: Sequence[InputSpec], output_names: Sequence[str], name: str = "pytorch"):
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

    def deactivate_impl(self) -> None:
        pass


@dataclass
class Comparison:
    """One backend at one shape, as in ``validate --json``."""

    backend: str
    shape: list[int]
    max_abs_err: float
    max_rel_err: float
    passed: bool


def _errors(got: np.ndarray, want: np.ndarray, atol: float) -> tuple[float, float]:
    """Max absolute error and max relative error (|got-want| / max(|want|, atol))."""
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    if diff.size == 0:
        return 0.0, 0.0
    rel = diff / np.maximum(np.abs(want.astype(np.float64)), atol)
    return float(diff.max()), float(rel.max())  # NaN propagates: it never passes


def compare(
    reference: BaseRunner,
    backends: dict[str, BaseRunner],
    specs: Sequence[InputSpec],
    shapes: Sequence[tuple[int, int]] = DEFAULT_SHAPES,
    dtype: str = "fp32",
    seed: int = 0,
) -> list[Comparison]:
    """Run the reference and every backend on fresh random inputs at each (batch, seq) shape
    and compare every output with Polygraphy's Comparator, with ``dtype``'s tolerances.
    ``specs`` are the backends' inputs (fp16 float inputs for an fp16 model); the reference
    runner computes in fp32 whatever it is fed."""
    rtol, atol = TOLERANCES[dtype]
    G_LOGGER.module_severity = G_LOGGER.CRITICAL  # our table reports; Polygraphy's own logs would mix into --json
    compare_func = SimpleCompareFunc(rtol=rtol, atol=atol, check_error_stat="elemwise")
    results = []
    for i, (batch, seq) in enumerate(shapes):
        feeds = random_inputs(specs, batch, seq, seed=seed + i)  # float inputs at the specs' precision
        run_results = Comparator.run([reference, *backends.values()], data_loader=[feeds])
        accuracy = Comparator.compare_accuracy(run_results, compare_func=compare_func)
        want = run_results[reference.name][0]
        for name, runner in backends.items():
            got = run_results[runner.name][0]
            abs_err, rel_err = 0.0, 0.0
            finite = True
            for out_name, want_out in want.items():
                got_out = np.asarray(got[out_name])
                a, r = _errors(got_out, np.asarray(want_out), atol)
                abs_err, rel_err = max(abs_err, a), max(rel_err, r)
                finite &= bool(np.isfinite(got_out).all() and np.isfinite(want_out).all())
            pair = accuracy[0][(reference.name, runner.name)]  # one AccuracyResult per compare func
            verdict = all(bool(match) for iteration in pair for match in iteration.values()) and finite
            results.append(Comparison(name, [batch, seq], abs_err, rel_err, verdict))
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


def decode_cases(meta: dict, steps: int) -> list[tuple[int, int]]:
    """Default (batch, prompt length) pairs for validate --decode: batch 1 and 3 at short and
    longer prompts and, for a model with local-window layers, prompts that end just before and
    at each window limit so the decode steps cross it; all within max_len."""
    prompts = {1, 5, 9}
    for cache in meta["caches"]:
        if cache["limit"]:
            prompts |= {max(cache["limit"] - 1, 1), cache["limit"] + 1}
    fits = sorted(p for p in prompts if p + steps <= meta["max_len"])
    return [(1, fits[0])] + [(3, p) for p in fits]


def compare_decode(onnx_path: str, model: torch.nn.Module, cases: Sequence[tuple[int, int]], steps: int,
                   dtype: str = "fp32", seed: int = 0) -> list[Comparison]:
    """Prefill + ``steps`` one-token decode steps of the decode graph in ORT against the
    PyTorch full-sequence forward of the same left-padded batch, row by row (the real
    positions; a padded query row's output is no token's). ``cases``: (batch, prompt length).
    Positions are the padded index, as the full forward computes them."""
    from .generate import DecodeSession

    rtol, atol = TOLERANCES[dtype]
    session = DecodeSession(onnx_path)
    model = eval_mode(model)
    rng = np.random.default_rng(seed)
    results = []
    for batch, prompt in cases:
        total = prompt + steps
        ids, mask = left_padded(rng, batch, prompt, total, session.vocab_size)
        positions = np.broadcast_to(np.arange(total), (batch, total))
        with torch.inference_mode():
            want = model(torch.from_numpy(ids), torch.from_numpy(mask).bool()).float().numpy()
        rows = [session.prefill(ids[:, :prompt], mask[:, :prompt], positions[:, :prompt])]
        for t in range(prompt, total):
            rows.append(session.step(ids[:, t:t + 1], mask[:, :t + 1], positions[:, t:t + 1]))
        got = np.concatenate(rows, axis=1)[mask.astype(bool)]
        want = want[mask.astype(bool)]
        abs_err, rel_err = _errors(got, want, atol)
        diff = np.abs(got.astype(np.float64) - want)
        passed = bool(np.isfinite(got).all() and ((diff <= atol) | (diff <= rtol * np.abs(want))).all())
        results.append(Comparison("ort-decode", [batch, prompt, steps], abs_err, rel_err, passed))
    return results


def ort_runner(onnx_path: str, name: str = "onnxruntime", threads: int | None = None) -> OnnxrtRunner:
    """OnnxrtRunner whose session comes from :func:`attn2onnx.runtime.session` (native kernel
    library registered when built; Polygraphy's own loader has no hook for it)."""
    from .runtime import session

    return OnnxrtRunner(lambda: session(onnx_path, backend="ort", threads=threads), name=name)


class TrtEngineRunner(BaseRunner):
    """Polygraphy runner over a TensorRT engine built (plugins registered) from the ONNX file
    with one profile covering every shape to be compared."""

    def __init__(self, onnx_path: str, specs: Sequence[InputSpec], shapes: Sequence[tuple[int, int]], name: str = "tensorrt"):
        super().__init__(name=name, prefix="trt-engine-runner")
        self.onnx_path, self.specs, self.shapes = onnx_path, list(specs), list(shapes)

    def activate_impl(self) -> None:
        from .runtime.tensorrt import TrtSession, engine_for_shapes

        self.session = TrtSession(engine_for_shapes(self.onnx_path, self.shapes))

    def get_input_metadata_impl(self) -> TensorMetadata:
        return input_metadata(self.specs)

    def infer_impl(self, feed_dict: dict) -> OrderedDict:
        start = time.perf_counter()
        outputs = self.session.run(feed_dict)
        self.inference_time = time.perf_counter() - start
        return OrderedDict(outputs)

    def deactivate_impl(self) -> None:
        del self.session


def backend_runners(onnx_path: str, backends: Sequence[str], specs: Sequence[InputSpec],
                    shapes: Sequence[tuple[int, int]]) -> dict[str, BaseRunner]:
    """Runner per backend name (``ort``, ``trt``); unknown names, or TensorRT where it is not
    installed, are usage errors (exit 2) before anything runs."""
    runners: dict[str, BaseRunner] = {}
    for backend in backends:
        if backend == "ort":
            runners[backend] = ort_runner(onnx_path)
        elif backend == "trt":
            from .runtime.tensorrt import _trt

            _trt()  # TensorRTUnavailable (a UsageError) where it is missing
            runners[backend] = TrtEngineRunner(onnx_path, specs, shapes)
        else:
            raise UsageError(f"unknown backend {backend!r}; choose from ort, trt")
    return runners


def summary(comparisons: Sequence[Comparison]) -> dict:
    """The ``validate --json`` object."""
    return {"passed": bool(comparisons) and all(c.passed for c in comparisons), "comparisons": [asdict(c) for c in comparisons]}


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


__all__ = ["TorchRunner", "Comparison", "compare", "compare_decode", "decode_cases", "ort_runner", "backend_runners",
           "summary", "parse_shapes", "TOLERANCES"]
