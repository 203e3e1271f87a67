"""Wall-clock timing as the benchmark tools do it: warm-up calls, then several timed ones,
reported as min / median / p90 (polygraphy ``--iterations``, onnxruntime_perf_test). Several
callables are timed interleaved, round by round, so a machine that gets busier in the middle
slows each of them alike and their ratio stays fair."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Mapping


@dataclass(frozen=True)
class Timing:
    """Times (ms) of the timed calls of one callable, after ``warmup`` untimed ones."""

    times_ms: tuple[float, ...]
    warmup: int

    @property
    def iterations(self) -> int:
        return len(self.times_ms)

    @property
    def min_ms(self) -> float:
        return min(self.times_ms)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def p90_ms(self) -> float:
        """90th percentile, interpolated between the sorted times (the one time of a single run)."""
        if len(self.times_ms) == 1:
            return self.times_ms[0]
        return statistics.quantiles(self.times_ms, n=10, method="inclusive")[-1]

    def to_dict(self) -> dict[str, float | int]:
        return {
            "warmup": self.warmup,
            "iterations": self.iterations,
            "min_ms": self.min_ms,
            "median_ms": self.median_ms,
            "p90_ms": self.p90_ms,
        }

    def __str__(self) -> str:
        """``1.10 ms (median of 10 runs after 1 warm-up; min 1.02 ms, p90 1.31 ms)``."""
        runs = f"{self.iterations} run{'s' if self.iterations != 1 else ''}"
        return (
            f"{self.median_ms:.2f} ms (median of {runs} after {self.warmup} warm-up; "
            f"min {self.min_ms:.2f} ms, p90 {self.p90_ms:.2f} ms)"
        )


def time_calls(
    calls: Mapping[str, Callable[[], object]],
    warmup: int,
    iterations: int,
    step: Callable[[], None] = lambda: None,
) -> dict[str, Timing]:
    """Time every callable of ``calls``: ``warmup`` rounds untimed, then ``iterations`` timed
        rounds; each round calls each callable once, in turn, the order reversed every other round
    (neither always runs right after the other's cache traffic). ``step`` is called after each round
        (a progress bar's ``update``)."""
    if iterations < 1 or warmup < 0:
        raise ValueError(f"need iterations >= 1 and warmup >= 0, got {iterations} and {warmup}")
    times: dict[str, list[float]] = {name: [] for name in calls}
    order = list(calls.items())
    for round_ in range(warmup + iterations):
        for name, call in order if round_ % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            call()
            if round_ >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
        step()
    return {name: Timing(tuple(t), warmup) for name, t in times.items()}
