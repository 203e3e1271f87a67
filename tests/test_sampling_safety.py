"""Sampling that no temperature or logit breaks (issue 19, item 7): ``generate --temperature
1e-320`` made softmax(logits / T) inf - inf = NaN probabilities (a traceback), and NaN or inf
logits went on to a traceback or a silent argmax of NaN. The softmax is now taken in float64
from logits less their maximum; a temperature that is not a finite number >= 0 and a step
whose logits hold NaN / +inf are one-line errors naming the step."""

from __future__ import annotations

import numpy as np
import pytest

from attn2onnx.errors import UsageError
from attn2onnx.generate import generate, pick_token

LOGITS = np.array([1.0, 3.0, 2.0, -np.inf, 3.0 - 1e-6], dtype=np.float32)


@pytest.mark.parametrize("temperature", [1e-320, 5e-324])
def test_a_tiny_temperature_picks_the_argmax(temperature):
    rng = np.random.default_rng(0)
    assert {pick_token(LOGITS, temperature, 0, rng) for _ in range(20)} == {1}
    assert pick_token(LOGITS, temperature, 2, rng) == 1


def test_a_tiny_temperature_shares_the_probability_between_tied_maxima():
    rng = np.random.default_rng(0)
    logits = np.array([5.0, 1.0, 5.0])
    assert {pick_token(logits, 1e-320, 0, rng) for _ in range(64)} == {0, 2}


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), -1.0, -1e-320])
def test_a_temperature_that_is_not_finite_and_non_negative_is_refused(temperature):
    with pytest.raises(UsageError, match="temperature must be a finite number >= 0"):
        pick_token(LOGITS, temperature, 0, np.random.default_rng(0))
    with pytest.raises(UsageError, match="temperature must be a finite number >= 0"):
        generate(FakeSession({}), [1], 3, temperature=temperature)


class FakeSession:
    """A DecodeSession stand-in whose logits are a fixed row, and ``bad`` ones at given steps
    (0 = the prefill)."""

    vocab_size, max_len = 5, 16

    def __init__(self, bad: dict[int, np.ndarray]) -> None:
        self.bad, self.calls = bad, 0

    def _logits(self) -> np.ndarray:
        row = self.bad.get(self.calls, np.arange(self.vocab_size, dtype=np.float32))
        self.calls += 1
        return np.asarray(row, dtype=np.float32)[None, None, :]

    def prefill(self, ids):
        return self._logits()

    def step(self, ids):
        return self._logits()


@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
@pytest.mark.parametrize("step, where", [(0, "the prefill"), (2, "decode step 2")])
def test_logits_with_nan_or_inf_name_the_step(value, temperature, step, where):
    row = np.array([0.0, 1.0, value, 2.0, 0.5])
    with pytest.raises(UsageError, match=f"^{where}: the model's logits hold NaN or inf"):
        generate(FakeSession({step: row}), [1], 4, temperature=temperature)


def test_logits_all_minus_inf_are_refused():
    with pytest.raises(UsageError, match="decode step 1: the model's logits hold NaN or inf"):
        generate(FakeSession({1: np.full(5, -np.inf)}), [1], 4, temperature=1.0)
