"""Every variant's module == its independent float64 oracle (tests/oracles) to 1e-10.

Several shapes, no mask / right padding / random masks (holes anywhere), causal where the
variant supports it. Only real query rows are compared: padded rows are unspecified.
"""

from __future__ import annotations

import numpy as np
import pytest

import oracles
from conftest import (
    assert_real_rows_close,
    build,
    config_of,
    random_mask,
    random_x,
    right_padding,
    run,
    weights_of,
)

D, N = 32, 4
SHAPES = [(2, 7), (1, 1), (3, 16)]
MASKS = ["none", "right", "random"]

# (variant, options) pairs; ids name them in test reports.
CASES = [
    ("mha", {}),
    ("mha", {"bias": False}),
    ("mha", {"causal": True}),
    ("optimised", {}),
    ("optimised", {"bias": False}),
    ("optimised", {"causal": True}),
    ("efficient", {}),
    ("efficient", {"bias": False}),
    ("efficient", {"causal": True}),
    ("super", {"max_len": 16}),
    ("super", {"max_len": 20, "bias": False}),
    ("super", {"max_len": 16, "causal": True}),
    ("dcmha", {}),
    ("dcmha", {"causal": True}),
    ("dcmha", {"qk_norm": True, "rope": True}),
    ("dcmha", {"causal": True, "qk_norm": True, "rope": True, "rotary_fraction": 0.5, "window": 3}),
    ("dcmha", {"causal": True, "static_mix": True, "rank": 1, "k_dim": 8}),
    ("dcmha", {"static_mix": True, "rope": True, "rope_base": 500.0, "bias": True}),
    ("dcmha", {"gelu_approx": "tanh", "qk_norm": True, "rotary_fraction": 0.75, "rope": True}),
    ("imhsa", {"landmarks": 4}),
    ("imhsa", {"landmarks": 3, "mix": "post"}),
    ("imhsa", {"landmarks": 5, "mix": "both"}),
    ("imhsa", {"landmarks": 8, "mix": "both", "bias": False}),  # T = 7 < L: empty segments
    ("bn", {}),
    ("bn", {"rescale": False}),
    ("bn", {"beta": 0.5, "eps": 1e-3}),
    ("sh", {}),
    ("sh", {"sh_factors": (1, 2, 3, 4)}),
    ("sh", {"sh_factors": (3, 1, 3, 2), "bias": False}),
    ("bn-sh", {}),
    ("bn-sh", {"sh_factors": (2, 1, 3, 1), "rescale": False, "beta": 0.7}),
]


def case_id(case):
    name, opts = case
    return name + ("" if not opts else "-" + "-".join(f"{k}={v}" for k, v in opts.items()))


def make_mask(kind, rng, b, t):
    return {"none": lambda: None, "right": lambda: right_padding(rng, b, t), "random": lambda: random_mask(rng, b, t)}[
        kind
    ]()


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_module_matches_oracle(case, rng):
    name, opts = case
    module = build(name, rng, d_model=D, n_heads=N, **opts)
    params, config = weights_of(module), config_of(module)
    for b, t in SHAPES:
        for kind in MASKS:
            x = random_x(rng, b, t, D)
            mask = make_mask(kind, rng, b, t)
            got = run(module, x, mask)
            want = oracles.run_oracle(name, params, config, x, mask)
            assert_real_rows_close(got, want, mask, what=f"{case_id(case)} B={b} T={t} mask={kind}")


@pytest.mark.parametrize(
    "opts", [{"grid": 2, "landmarks": 4}, {"grid": 3, "landmarks": 9, "mix": "both"}], ids=["grid2", "grid3-both"]
)
def test_imhsa_grid_matches_oracle(opts, rng):
    """2-D pooling of a square feature map (side divisible by s, and not)."""
    module = build("imhsa", rng, d_model=D, n_heads=N, **opts)
    params, config = weights_of(module), config_of(module)
    for b, t in [(2, 36), (1, 16), (2, 49)]:
        for kind in MASKS:
            x = random_x(rng, b, t, D)
            mask = make_mask(kind, rng, b, t)
            assert_real_rows_close(
                run(module, x, mask),
                oracles.run_oracle("imhsa", params, config, x, mask),
                mask,
                what=f"imhsa {opts} T={t} mask={kind}",
            )


def _prev_probs(rng, b, t, mask, causal):
    """A valid [B,N,T,T] probability tensor (masked softmax of random logits)."""
    allowed = oracles._common.allowed_mask(oracles._common.padding_mask(mask, b, t), t, causal)
    return oracles._common.masked_softmax(rng.standard_normal((b, N, t, t)) * 2, allowed)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("reuse_heads", [0, 1, 3, N])
def test_reuse_layer_matches_oracle(reuse_heads, causal, rng):
    module = build("reuse", rng, d_model=D, n_heads=N, reuse_heads=reuse_heads, causal=causal)
    params, config = weights_of(module), config_of(module)
    for b, t in SHAPES:
        for kind in MASKS:
            x = random_x(rng, b, t, D)
            mask = make_mask(kind, rng, b, t)
            prev = _prev_probs(rng, b, t, mask, causal) if reuse_heads else None
            y, probs = run(module, x, mask, prev_probs=prev)
            y_want, probs_want = oracles.run_oracle("reuse", params, config, x, mask, prev_probs=prev)
            what = f"reuse P={reuse_heads} causal={causal} B={b} T={t} mask={kind}"
            assert_real_rows_close(y, y_want, mask, what=what + " y")
            assert probs.shape == (b, N, t, t), (what, probs.shape)
            assert_real_rows_close(
                probs.transpose(0, 2, 1, 3), probs_want.transpose(0, 2, 1, 3), mask, what=what + " probs"
            )
            if reuse_heads == N:  # full reuse passes the previous tensor on unchanged
                assert_real_rows_close(probs.transpose(0, 2, 1, 3), prev.transpose(0, 2, 1, 3), mask, what=what)


@pytest.mark.parametrize("name", list(oracles.ORACLES))
def test_no_mask_equals_all_true_mask(name, rng):
    opts = {"reuse_heads": 0} if name == "reuse" else {"landmarks": 4} if name == "imhsa" else {}
    module = build(name, rng, d_model=D, n_heads=N, **opts)
    x = random_x(rng, 2, 9, D)
    a, b = run(module, x, None), run(module, x, np.ones((2, 9), dtype=bool))
    a, b = (a[0], b[0]) if isinstance(a, tuple) else (a, b)
    np.testing.assert_allclose(a, b, atol=1e-12, rtol=0)


PADDING_CASES = [c for c in CASES if c[0] != "imhsa" or c[1].get("landmarks", 0) <= 5] + [("reuse", {"reuse_heads": 0})]


@pytest.mark.parametrize("case", PADDING_CASES, ids=case_id)
def test_right_padding_leaves_real_rows_unchanged(case, rng):
    """Real rows of a right-padded batch == the same rows run without the padding (truncated)."""
    name, opts = case
    module = build(name, rng, d_model=D, n_heads=N, **opts)
    t = 11
    x = random_x(rng, 3, t, D)
    mask = right_padding(rng, 3, t)
    padded = run(module, x, mask)
    padded = padded[0] if isinstance(padded, tuple) else padded
    for b in range(3):
        n = int(mask[b].sum())
        alone = run(module, x[b : b + 1, :n], None)
        alone = alone[0] if isinstance(alone, tuple) else alone
        np.testing.assert_allclose(padded[b, :n], alone[0], atol=1e-10, rtol=1e-10, err_msg=f"{case_id(case)} b={b}")


@pytest.mark.parametrize("name", [n for n in oracles.ORACLES])
def test_float32_close_to_oracle(name, rng):
    """The module in float32 (as deployed) stays near the float64 oracle."""
    import torch

    opts = {"reuse_heads": 0} if name == "reuse" else {"landmarks": 4} if name == "imhsa" else {}
    module = build(name, rng, d_model=D, n_heads=N, **opts)
    params, config = weights_of(module), config_of(module)
    module = module.to(torch.float32)
    x = random_x(rng, 2, 10, D)
    mask = random_mask(rng, 2, 10)
    with torch.no_grad():
        got = module(torch.as_tensor(x, dtype=torch.float32), key_padding_mask=torch.as_tensor(mask))
    got = (got[0] if isinstance(got, tuple) else got).double().numpy()
    want = oracles.run_oracle(name, params, config, x, mask)
    want = want[0] if isinstance(want, tuple) else want
    assert_real_rows_close(got, want, mask, atol=1e-4, rtol=1e-4, what=name)
