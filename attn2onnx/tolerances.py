"""The rule a parity check judges each output by, and its verdict per output, through Polygraphy.

A :class:`Tolerance` is an absolute and a relative tolerance (per-dtype defaults in
:data:`TOLERANCES`, either overridable: ``--atol`` / ``--rtol``) and the error statistic checked
against them, as Polygraphy's ``CompareFunc.simple`` (``--check-error-stat``) defines them, with
``rel = |got - want| / |want|``:

* ``elemwise`` (default): every element within atol absolutely or within rtol relatively;
* ``max`` / ``mean`` / ``median``: that statistic of the absolute errors within atol, or that
  statistic of the relative errors within rtol.

NaN or infinity in either output never passes. :func:`judge` gives one :class:`OutputError` per
output (the statistic's absolute and relative value; ``max`` for ``elemwise``, the tolerance it
would need).

A graph whose weights ``attn2onnx quantize`` rounded to int4 / int8 is judged by its mode's
rule instead (:func:`quantized_tolerance`, :data:`QUANTIZED_TOLERANCES`): the ``rms`` statistic,
the root-mean-square error of each output, passes within atol absolutely or within rtol
relative to the reference output's own RMS. Rounding every weight moves every element a little,
so an elementwise rule built for fp32 rounding says nothing; the relative RMS error is the
output's noise-to-signal ratio, the same for logits of any scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from .errors import UsageError

# (rtol, atol) per dtype: an element passes when within atol absolutely or rtol relatively.
TOLERANCES = {"fp32": (1e-5, 1e-5), "fp16": (1e-2, 1e-2), "bf16": (2e-2, 2e-2)}
ERROR_STATS = ("elemwise", "max", "mean", "median")
RMS_STAT = "rms"  # quantized graphs' statistic (not Polygraphy's: judged here)
# (rtol, atol) per weight width of a quantized graph, on the rms statistic. Measured against fp32
# PyTorch (docs/architecture.md "Quantized graphs"): int8 <= 0.03, int4 <= 0.26 on the test and
# benchmark LMs at any block size; block scales off by x1.15 (int8) / x1.5 (int4) gave >= 0.17 / 0.54.
QUANTIZED_TOLERANCES = {"int8": (0.08, 1e-5), "int4": (0.45, 1e-5)}


@dataclass(frozen=True)
class Tolerance:
    """The rule of a check: ``atol`` / ``rtol`` (the ``dtype``'s defaults unless overridden) on
    the error statistic ``stat`` of every output."""

    dtype: str
    atol: float
    rtol: float
    stat: str = "elemwise"

    def __str__(self) -> str:
        return f"{self.dtype} tolerance: atol {self.atol:g}, rtol {self.rtol:g}, {self.stat} error"


def tolerance(
    dtype: str = "fp32", atol: float | None = None, rtol: float | None = None, stat: str = "elemwise"
) -> Tolerance:
    """The :class:`Tolerance` for ``dtype`` with ``atol`` / ``rtol`` overriding its defaults
    where given; a negative or non-finite tolerance, or an unknown dtype or statistic, is a
    UsageError."""
    if dtype not in TOLERANCES:
        raise UsageError(f"no tolerances for dtype {dtype!r}; choose from {', '.join(TOLERANCES)}")
    if stat not in ERROR_STATS:
        raise UsageError(f"unknown error statistic {stat!r}; choose from {', '.join(ERROR_STATS)}")
    default_rtol, default_atol = TOLERANCES[dtype]
    for flag, value in (("atol", atol), ("rtol", rtol)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise UsageError(f"--{flag} must be a finite number >= 0, got {value}")
    return Tolerance(
        dtype, default_atol if atol is None else float(atol), default_rtol if rtol is None else float(rtol), stat
    )


def quantized_tolerance(mode, atol: float | None = None, rtol: float | None = None) -> Tolerance:
    """The rule of a graph quantized as ``mode`` (attn2onnx.quantize.QuantMode): its weight
    width's :data:`QUANTIZED_TOLERANCES` on the ``rms`` statistic, ``atol`` / ``rtol``
    overriding them where given; the rule is named after the mode (``int4/block32``)."""
    default_rtol, default_atol = QUANTIZED_TOLERANCES[mode.weights]
    rule = tolerance("fp32", default_atol if atol is None else atol, default_rtol if rtol is None else rtol)
    return Tolerance(str(mode), rule.atol, rule.rtol, RMS_STAT)


@dataclass
class OutputError:
    """One output judged by a :class:`Tolerance`: its error statistic, absolute and relative
    (the max for ``elemwise``), and whether it passed."""

    name: str
    abs_err: float
    rel_err: float
    passed: bool


def judge(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray], rule: Tolerance) -> list[OutputError]:
    """Every output of ``want`` (the reference) against the same-named one of ``got`` with
    Polygraphy's simple compare function under ``rule``; an output holding NaN or infinity fails."""
    if rule.stat == RMS_STAT:
        return [_rms_error(name, np.asarray(got[name]), np.asarray(w), rule) for name, w in want.items()]
    from polygraphy.comparator import IterationResult, SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.CRITICAL  # the caller reports; Polygraphy's logs would mix into --json
    compare = SimpleCompareFunc(rtol=rule.rtol, atol=rule.atol, check_error_stat=rule.stat)
    sized = [n for n, w in want.items() if np.size(w) or np.size(got[n])]  # an empty output has no statistic
    results = compare(
        IterationResult({n: np.asarray(got[n]) for n in sized}, runner_name="got"),
        IterationResult({n: np.asarray(want[n]) for n in sized}, runner_name="want"),
    )
    stat = "max" if rule.stat == "elemwise" else rule.stat
    errors = []
    for name, want_out in want.items():
        got_out = np.asarray(got[name])
        if name not in results:
            errors.append(OutputError(name, 0.0, 0.0, got_out.shape == np.shape(want_out)))
            continue
        result = results[name]
        if isinstance(result, bool):  # Polygraphy's verdict on outputs of different shapes: no statistic
            errors.append(OutputError(name, math.nan, math.nan, False))
            continue
        finite = bool(np.isfinite(got_out).all() and np.isfinite(want_out).all())
        abs_err, rel_err = (float(getattr(result, f"{stat}_{kind}diff")) for kind in ("abs", "rel"))
        errors.append(OutputError(name, abs_err, rel_err, bool(result) and finite))
    return errors


def _rms_error(name: str, got: np.ndarray, want: np.ndarray, rule: Tolerance) -> OutputError:
    """``got`` against ``want`` on the ``rms`` statistic: the RMS of the error, absolutely and
    relative to the RMS of ``want``; passes within atol or rtol. Another shape, NaN or infinity
    fails; two empty outputs pass."""
    if got.shape != want.shape:
        return OutputError(name, math.nan, math.nan, False)
    if want.size == 0:
        return OutputError(name, 0.0, 0.0, True)
    diff = got.astype(np.float64) - want.astype(np.float64)
    abs_err = float(np.sqrt(np.mean(diff**2)))
    scale = float(np.sqrt(np.mean(want.astype(np.float64) ** 2)))
    rel_err = abs_err / scale if scale > 0 else (0.0 if abs_err == 0 else math.inf)
    finite = bool(np.isfinite(got).all() and np.isfinite(want).all())
    return OutputError(name, abs_err, rel_err, finite and (abs_err <= rule.atol or rel_err <= rule.rtol))


# How far a backend may stray from float64 beyond the rule, as a multiple of the fp32 reference's
# own distance from float64 (see within_reference_error).
REFERENCE_ERROR_FACTOR = 2.0


def reference_error(want: Mapping[str, np.ndarray], want64: Mapping[str, np.ndarray]) -> float:
    """The fp32 reference's own error: its largest distance from the float64 run of the same model."""
    return max(
        (float(np.abs(np.asarray(w, np.float64) - want64[n]).max(initial=0.0)) for n, w in want.items()), default=0.0
    )


def within_reference_error(
    got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray], want64: Mapping[str, np.ndarray], rule: Tolerance
) -> bool:
    """Whether ``got`` is as close to the float64 truth ``want64`` as the fp32 reference ``want``
    is, elementwise: |got - want64| <= atol + rtol |want64| + REFERENCE_ERROR_FACTOR |want - want64|.

    An input where the model is ill-conditioned (Attention-BN over a row with one real key: a
    variance near 0 under its eps amplifies every rounding ~300x) moves any fp32 implementation,
    PyTorch's own included, past an fp32 tolerance; there the backend is judged against float64
    with the reference's own error as the allowance, so a wrong graph (error O(1)) still fails
    and a right one is not failed for the model's conditioning. Non-finite values never pass."""
    for name, w in want.items():
        g, w, t = (np.asarray(a, np.float64) for a in (got[name], w, want64[name]))
        if g.shape != t.shape or not (np.isfinite(g).all() and np.isfinite(t).all()):
            return False
        allowed = rule.atol + rule.rtol * np.abs(t) + REFERENCE_ERROR_FACTOR * np.abs(w - t)
        if not (np.abs(g - t) <= allowed).all():
            return False
    return True


__all__ = [
    "ERROR_STATS",
    "QUANTIZED_TOLERANCES",
    "RMS_STAT",
    "REFERENCE_ERROR_FACTOR",
    "TOLERANCES",
    "OutputError",
    "Tolerance",
    "judge",
    "quantized_tolerance",
    "reference_error",
    "tolerance",
    "within_reference_error",
]
