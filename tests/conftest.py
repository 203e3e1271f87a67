"""Shared test helpers: seeded rng, float64 modules with random weights, weights as numpy.

Test files import the helpers directly (``from conftest import ...``); the float64 oracles
live in tests/oracles (pure numpy).
"""

from __future__ import annotations

import math
import os
import zlib

import numpy as np
import pytest
import torch

# The tests run many tiny ops: torch's intra-op threads only contend (50x slower on a loaded
# 2-core machine), so the whole session runs single-threaded.
torch.set_num_threads(1)

# Variants as variants.md defines them: name -> supports causal.
CAUSAL_CAPABLE = {
    "mha": True,
    "optimised": True,
    "efficient": True,
    "super": True,
    "dcmha": True,
    "imhsa": False,
    "reuse": True,
    "bn": False,
    "sh": False,
    "bn-sh": False,
}
ALL_VARIANTS = list(CAUSAL_CAPABLE)


def skip_or_fail(reason: str) -> None:
    """Skip a test whose requirement this machine lacks; under CI (``CI=true``), where the
    project's own scripts install everything the tests need, fail instead, so that a broken
    install or a regression never shows up as a quiet skip."""
    if os.environ.get("CI"):
        pytest.fail(f"required under CI: {reason}")
    pytest.skip(reason)


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A generator seeded from the test's node id: reproducible, different per test."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def to_float64(module: torch.nn.Module) -> torch.nn.Module:
    """The module in float64 and eval mode (in place; returned for chaining)."""
    return module.to(torch.float64).eval()


def weights_of(module: torch.nn.Module) -> dict[str, np.ndarray]:
    """Every parameter (by its qualified name) as a float64 numpy array."""
    return {name: p.detach().to(torch.float64).cpu().numpy().copy() for name, p in module.named_parameters()}


def set_weights(module: torch.nn.Module, weights: dict[str, np.ndarray]) -> torch.nn.Module:
    """Copy numpy arrays into the module's parameters by name (shapes must match)."""
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            p = params[name]
            value = torch.as_tensor(np.asarray(value), dtype=p.dtype)
            assert value.shape == p.shape, (name, tuple(value.shape), tuple(p.shape))
            p.copy_(value)
    return module


def random_weights(module: torch.nn.Module, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random values for every parameter, scaled so logits and activations stay O(1):
    matrices ~ N(0, 1/fan_in) (fan_in = first axis, or the in-axis of nn.Linear), vectors
    (biases) ~ N(0, 0.3^2), norm gains 1 + N(0, 0.2^2)."""
    out = {}
    for name, p in module.named_parameters():
        shape = tuple(p.shape)
        leaf = name.rsplit(".", 1)[-1]
        if "gain" in leaf:
            out[name] = 1.0 + 0.2 * rng.standard_normal(shape)
        elif len(shape) == 1:
            out[name] = 0.3 * rng.standard_normal(shape)
        else:
            fan_in = shape[-1] if leaf == "weight" else shape[0]
            out[name] = rng.standard_normal(shape) / math.sqrt(max(fan_in, 1))
    return out


def build(name: str, rng: np.random.Generator | None = None, **options) -> torch.nn.Module:
    """A float64 eval-mode module of variant ``name``; random weights when rng is given."""
    from attn2onnx.variants import build_attention

    module = to_float64(build_attention(name, **options))
    if rng is not None:
        set_weights(module, random_weights(module, rng))
    return module


def config_of(module: torch.nn.Module) -> dict:
    return module.config.to_dict()


def run(module: torch.nn.Module, x: np.ndarray, key_padding_mask: np.ndarray | None = None, **kw):
    """Run the module on numpy inputs in float64, no grad; tensors in the result -> numpy."""
    xt = torch.as_tensor(x, dtype=torch.float64)
    mt = None if key_padding_mask is None else torch.as_tensor(key_padding_mask, dtype=torch.bool)
    kw = {k: (torch.as_tensor(v, dtype=torch.float64) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    with torch.no_grad():
        out = module(xt, key_padding_mask=mt, **kw)
    if isinstance(out, tuple):
        return tuple(o.detach().cpu().numpy() for o in out)
    return out.detach().cpu().numpy()


def random_x(rng: np.random.Generator, batch: int, length: int, d_model: int) -> np.ndarray:
    return rng.standard_normal((batch, length, d_model))


def right_padding(rng: np.random.Generator, batch: int, length: int) -> np.ndarray:
    """[B,T] bool, row b real for its first n_b tokens, n_b in [1, T]; row 0 is full length
    and (T > 1) row 1 is shorter, so both cases always occur."""
    lengths = rng.integers(1, length + 1, size=batch)
    lengths[0] = length
    if batch > 1 and length > 1:
        lengths[1] = rng.integers(1, length)
    return np.arange(length)[None, :] < lengths[:, None]


def random_mask(rng: np.random.Generator, batch: int, length: int, p_real: float = 0.7) -> np.ndarray:
    """[B,T] bool with holes anywhere (left padding included), at least one real token per row."""
    m = rng.random((batch, length)) < p_real
    for b in range(batch):
        if not m[b].any():
            m[b, rng.integers(length)] = True
    if length > 1:
        m[0, 0] = False  # a padded first token (left padding) always occurs
        if not m[0].any():
            m[0, -1] = True
    return m


def assert_real_rows_close(
    actual: np.ndarray, expected: np.ndarray, key_padding_mask, atol: float = 1e-10, rtol: float = 1e-10, what: str = ""
) -> None:
    """Compare [B,T,...] outputs on real query rows only (padded rows are unspecified)."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    if key_padding_mask is not None:
        actual, expected = actual[key_padding_mask], expected[key_padding_mask]
    assert np.isfinite(expected).all() and np.isfinite(actual).all(), f"non-finite output {what}"
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=rtol, err_msg=what)


@pytest.fixture
def umask_022():
    """The process umask 022 for the test (a new file's mode is then what open() gives: 0644)."""
    old = os.umask(0o022)
    yield
    os.umask(old)
