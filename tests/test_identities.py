"""The exact identities of variants.md, in float64 with random weights.

Each identity is checked on the modules (held against each other or against a direct numpy
formula) and, where it says something about the oracles themselves, on the oracles too.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import oracles
from oracles._common import (
    allowed_mask,
    attend,
    linear,
    merge_heads,
    padding_mask,
    rms_norm,
    rope,
    softmax,
    split_heads,
)
from conftest import (
    assert_real_rows_close,
    build,
    config_of,
    random_mask,
    random_x,
    right_padding,
    run,
    set_weights,
    weights_of,
)

D, N = 32, 4
d = D // N


def masks(rng, b, t):
    return [None, right_padding(rng, b, t), random_mask(rng, b, t)]


def copy_linear(dst: dict, src: dict, *projs):
    for p in projs:
        for leaf in ("weight", "bias"):
            if f"{p}_proj.{leaf}" in src:
                dst[f"{p}_proj.{leaf}"] = src[f"{p}_proj.{leaf}"]
    return dst


def identity_linear(dst: dict, proj: str):
    dst[f"{proj}_proj.weight"] = np.eye(D)
    if f"{proj}_proj.bias" in dst:
        dst[f"{proj}_proj.bias"] = np.zeros(D)
    return dst


def compare_modules(a, b, rng, t=9, what=""):
    for mask in masks(rng, 2, t):
        x = random_x(rng, 2, t, D)
        assert_real_rows_close(run(a, x, mask), run(b, x, mask), mask, what=what)


# ---------------------------------------------------------------- optimised / efficient / super


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_optimised_is_mha_with_identity_wv(causal, rng):
    opt = build("optimised", rng, d_model=D, n_heads=N, causal=causal)
    mha = build("mha", None, d_model=D, n_heads=N, causal=causal)
    w = copy_linear(weights_of(mha), weights_of(opt), "q", "k", "o")
    set_weights(mha, identity_linear(w, "v"))
    compare_modules(opt, mha, rng, what="optimised vs mha(Wv=I)")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_efficient_is_mha_with_identity_wk_wv(causal, rng):
    eff = build("efficient", rng, d_model=D, n_heads=N, causal=causal)
    mha = build("mha", None, d_model=D, n_heads=N, causal=causal)
    w = copy_linear(weights_of(mha), weights_of(eff), "q", "o")
    set_weights(mha, identity_linear(identity_linear(w, "k"), "v"))
    compare_modules(eff, mha, rng, what="efficient vs mha(Wk=Wv=I)")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_fresh_super_is_efficient(causal, rng):
    """Default WA init is the identity weight and a zero bias, so a fresh super layer equals efficient."""
    sup = build("super", None, d_model=D, n_heads=N, causal=causal, max_len=16)
    np.testing.assert_array_equal(oracles.param(weights_of(sup), "wa"), np.eye(16))
    np.testing.assert_array_equal(oracles.param(weights_of(sup), "wa_bias"), np.zeros(16))
    eff = build("efficient", rng, d_model=D, n_heads=N, causal=causal)
    set_weights(sup, copy_linear({}, weights_of(eff), "q", "o"))
    compare_modules(sup, eff, rng, what="fresh super vs efficient")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_super_output_is_probs_times_wa_times_x(causal, rng):
    """super output == concat((P_i WA) X_i + P_i b) Wo (+ bo), WA -> tril(WA) when causal, with
    WA's bias b [T] broadcast over the head's features."""
    L = 12
    sup = build("super", rng, d_model=D, n_heads=N, causal=causal, max_len=L)
    w = weights_of(sup)
    wq, bq = oracles.linear_weights(w, "q_proj")
    wo, bo = oracles.linear_weights(w, "o_proj")
    wa, wa_bias = oracles.param(w, "wa"), oracles.param(w, "wa_bias")
    for t in (L, 5):
        x = random_x(rng, 2, t, D)
        q, xs = split_heads(linear(x, wq, bq), N), split_heads(x, N)
        p = softmax(
            np.where(
                allowed_mask(np.ones((2, t), bool), t, causal),
                np.einsum("btnd,bsnd->bnts", q, xs) / math.sqrt(d),
                -1e300,
            )
        )
        mix = np.tril(wa[:t, :t]) if causal else wa[:t, :t]
        pw = p @ mix  # P_i WA  [B,N,T,T]
        pb = np.einsum("bnts,s->btn", p, wa_bias[:t])[..., None]  # P_i b, the same for every feature
        want = linear(merge_heads(np.einsum("bnts,bsnd->btnd", pw, xs) + pb), wo, bo)
        np.testing.assert_allclose(run(sup, x), want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_super_padded_rows_of_u_are_zero(causal, rng):
    """Padded rows of U = WA x + b are re-zeroed: a row with no real token attends uniformly to
    zero values, so its output is bo whatever WA's bias is; the other rows match the oracle."""
    sup = build("super", rng, d_model=D, n_heads=N, causal=causal, max_len=12)
    w = weights_of(sup)
    assert np.abs(oracles.param(w, "wa_bias")).min() > 0
    x, mask = random_x(rng, 2, 7, D), np.ones((2, 7), bool)
    mask[0, 4:], mask[1] = False, False
    got = run(sup, x, mask)
    np.testing.assert_allclose(got[1], np.broadcast_to(oracles.linear_weights(w, "o_proj")[1], (7, D)), atol=1e-12)
    want = oracles.super_attention(x, key_padding_mask=mask, **oracles.oracle_kwargs("super", w, config_of(sup)))
    np.testing.assert_allclose(got, want, atol=1e-10, rtol=1e-10)


def test_super_longer_than_max_len_is_an_error(rng):
    sup = build("super", rng, d_model=D, n_heads=N, max_len=8)
    with pytest.raises(ValueError):
        run(sup, random_x(rng, 1, 9, D))


def test_oracle_identities_paper_variants(rng):
    x = random_x(rng, 2, 10, D)
    wq, wk, wo = (rng.standard_normal((D, D)) / math.sqrt(D) for _ in range(3))
    bq, bk, bo = (rng.standard_normal(D) * 0.3 for _ in range(3))
    eye, zero = np.eye(D), np.zeros(D)
    for mask in masks(rng, 2, 10):
        for causal in (False, True):
            kw = dict(key_padding_mask=mask, causal=causal)
            ref = oracles.mha(x, wq, wk, eye, wo, N, bq, bk, zero, bo, **kw)
            assert_real_rows_close(oracles.optimised(x, wq, wk, wo, N, bq, bk, bo, **kw), ref, mask)
            ref = oracles.mha(x, wq, eye, eye, wo, N, bq, zero, zero, bo, **kw)
            eff = oracles.efficient(x, wq, wo, N, bq, bo, **kw)
            assert_real_rows_close(eff, ref, mask)
            assert_real_rows_close(oracles.super_attention(x, wq, wo, np.eye(16), N, bq, bo, **kw), eff, mask)


# ---------------------------------------------------------------- dcmha


def _zero_dynamic(w):
    for name in ("dw1", "qkw", "dd"):
        key = next(k for k in w if k == name or k.endswith("." + name))
        w[key] = np.zeros_like(w[key])
    return w


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_dcmha_without_dynamic_weights_is_mha(causal, rng):
    dc = build("dcmha", rng, d_model=D, n_heads=N, causal=causal)
    set_weights(dc, _zero_dynamic(weights_of(dc)))
    mha = build("mha", None, d_model=D, n_heads=N, causal=causal, bias=config_of(dc)["bias"])
    set_weights(mha, copy_linear({}, weights_of(dc), "q", "k", "v", "o"))
    compare_modules(dc, mha, rng, what="dcmha(dw1=qkw=dd=0) vs mha")


def _mha_qknorm_rope(x, w, mask, causal, window, fraction, base):
    """Plain softmax attention with QK-norm (RMS over d, eps 1e-6, gain) then rotate-half RoPE."""
    b, t, _ = x.shape
    q, k, v = (split_heads(linear(x, *oracles.linear_weights(w, f"{p}_proj")), N) for p in "qkv")
    q = rope(rms_norm(q, oracles.param(w, "q_norm_gain")), np.arange(t), base, fraction)
    k = rope(rms_norm(k, oracles.param(w, "k_norm_gain")), np.arange(t), base, fraction)
    o, _ = attend(q, k, v, allowed_mask(padding_mask(mask, b, t), t, causal, window))
    return linear(merge_heads(o), *oracles.linear_weights(w, "o_proj"))


@pytest.mark.parametrize(
    "opts",
    [
        {"causal": False, "window": None, "rotary_fraction": 1.0},
        {"causal": True, "window": 4, "rotary_fraction": 0.5},
    ],
    ids=["full", "causal-window-partial"],
)
def test_dcmha_without_dynamic_weights_is_mha_with_qknorm_rope(opts, rng):
    dc = build("dcmha", rng, d_model=D, n_heads=N, qk_norm=True, rope=True, rope_base=1000.0, **opts)
    w = _zero_dynamic(weights_of(dc))
    set_weights(dc, w)
    for mask in masks(rng, 2, 11):
        x = random_x(rng, 2, 11, D)
        want = _mha_qknorm_rope(x, w, mask, opts["causal"], opts["window"] or 0, opts["rotary_fraction"], 1000.0)
        assert_real_rows_close(run(dc, x, mask), want, mask)


DECODE_OPTS = [
    {},
    {"qk_norm": True, "rope": True, "rotary_fraction": 0.5, "window": 3, "static_mix": True},
]


@pytest.mark.parametrize("opts", DECODE_OPTS, ids=["plain", "qknorm-rope-window-static"])
def test_dcmha_decode_equals_full_forward(opts, rng):
    """Step-by-step decoding with a cache of K, V and the key-side factors (10N per token), row
    by row == the full causal forward: the oracle's decode against the module's full forward,
    and the oracle's own full forward against its decode."""
    dc = build("dcmha", rng, d_model=D, n_heads=N, causal=True, **opts)
    params, config = weights_of(dc), config_of(dc)
    kw = oracles.oracle_kwargs("dcmha", params, config)
    kw.pop("causal")
    for mask in masks(rng, 2, 9):
        x = random_x(rng, 2, 9, D)
        step = oracles.dcmha_decode(x, key_padding_mask=mask, **kw)
        full = oracles.dcmha(x, key_padding_mask=mask, causal=True, **kw)
        assert_real_rows_close(step, full, mask, what="oracle decode vs oracle full")
        assert_real_rows_close(run(dc, x, mask), step, mask, what="module full vs oracle decode")
        for split in ([1] * 9, [4, 1, 3, 1]):  # token by token, and in chunks
            assert_real_rows_close(_module_decode(dc, x, mask, split), step, mask, what=f"module decode {split}")


def _module_decode(dc, x, mask, split):
    """The module's own cache API: init_cache, then forward_step over the pieces of ``split``."""
    import torch

    cache = dc.init_cache(x.shape[0])
    rows, start = [], 0
    with torch.no_grad():
        for n in split:
            piece = torch.as_tensor(x[:, start : start + n])
            m = None if mask is None else torch.as_tensor(mask[:, start : start + n])
            y, cache = dc.forward_step(piece, cache, key_padding_mask=m)
            rows.append(y.numpy())
            start += n
        # the cache holds per token K, V and only the key-side factors: 2 slots x (2R+1) x N = 10N at R = 2
        assert tuple(cache.k_factors.shape[2:]) == (2, 5, N)
    assert start == x.shape[1]
    return np.concatenate(rows, axis=1)


def _random_dcmha_weights(rng, r=2, k=4 * N):
    w = dict(
        wq=rng.standard_normal((D, D)) / math.sqrt(D),
        wk=rng.standard_normal((D, D)) / math.sqrt(D),
        wv=rng.standard_normal((D, D)) / math.sqrt(D),
        wo=rng.standard_normal((D, D)) / math.sqrt(D),
        dw1=rng.standard_normal((D, 4, k)) / math.sqrt(D),
        qkw=rng.standard_normal((4, k, 2 * r, N)) * 0.5,
        dd=rng.standard_normal((D, 4 * N)) / math.sqrt(D),
        q_norm_gain=1 + 0.2 * rng.standard_normal(d),
        k_norm_gain=1 + 0.2 * rng.standard_normal(d),
        static_mix=0.3 * rng.standard_normal((2, N, N)),
    )
    return w


def test_oracle_dcmha_decode_and_zero_dynamic(rng):
    """Oracle self-checks: decode == full causal forward; dw1 = qkw = dd = 0 gives mha."""
    w = _random_dcmha_weights(rng)
    x = random_x(rng, 2, 8, D)
    for mask in masks(rng, 2, 8):
        kw = dict(w, n_heads=N, qk_norm=True, use_rope=True, rotary_fraction=0.5, window=3, key_padding_mask=mask)
        assert_real_rows_close(oracles.dcmha_decode(x, **kw), oracles.dcmha(x, causal=True, **kw), mask)
        zero = dict(w, dw1=0 * w["dw1"], qkw=0 * w["qkw"], dd=0 * w["dd"], static_mix=None)
        for causal in (False, True):
            ref = oracles.mha(x, w["wq"], w["wk"], w["wv"], w["wo"], N, key_padding_mask=mask, causal=causal)
            assert_real_rows_close(
                oracles.dcmha(
                    x,
                    n_heads=N,
                    key_padding_mask=mask,
                    causal=causal,
                    **{k: v for k, v in zero.items() if "gain" not in k},
                ),
                ref,
                mask,
            )


def test_dcmha_default_shapes(rng):
    """R = 2, K = 4N by default; dw1 [D,4,K], qkw [4,K,2R,N], dd [D,4N], gains [d]."""
    w = weights_of(build("dcmha", None, d_model=D, n_heads=N, qk_norm=True))
    k = 4 * N
    assert oracles.param(w, "dw1").shape == (D, 4, k)
    assert oracles.param(w, "qkw").shape == (4, k, 4, N)
    assert oracles.param(w, "dd").shape == (D, 4 * N)
    assert oracles.param(w, "q_norm_gain").shape == (d,)
    assert oracles.param(w, "k_norm_gain").shape == (d,)


def test_dcmha_compose_never_mixes_positions(rng):
    """Oracle check: Compose acts per (t, s) on the head vector, linearly."""
    b, t, s, r = 1, 4, 5, 2
    a = rng.standard_normal((b, N, t, s))
    uq, vq = rng.standard_normal((b, t, r, N)), rng.standard_normal((b, t, r, N))
    uk, vk = rng.standard_normal((b, s, r, N)), rng.standard_normal((b, s, r, N))
    gq, gk, wb = rng.standard_normal((b, t, N)), rng.standard_normal((b, s, N)), rng.standard_normal((N, N))
    out = oracles.compose(a, uq, vq, gq, uk, vk, gk, wb)
    ti, si = 2, 3
    vec = a[0, :, ti, si]
    want = (
        vec
        + (vec @ uq[0, ti].T) @ vq[0, ti]
        + (vec @ uk[0, si].T) @ vk[0, si]
        + vec * gq[0, ti]
        + vec * gk[0, si]
        + vec @ wb
    )
    np.testing.assert_allclose(out[0, :, ti, si], want, atol=1e-12)


# ---------------------------------------------------------------- imhsa


def _identity_mixing(w):
    for key in list(w):
        leaf = key.rsplit(".", 1)[-1]
        if leaf.startswith(("pre_mix", "post_mix")):
            w[key] = np.eye(N)
        elif leaf.startswith(("pre_bias", "post_bias")):
            w[key] = np.zeros(N)
    return w


@pytest.mark.parametrize("mix", ["pre", "post", "both"])
def test_imhsa_with_t_landmarks_is_two_softmaxes(mix, rng):
    """L = T (segments of 1), identity mixing => concat(softmax(qk^T/sqrt d) softmax(qk^T/sqrt d) v) Wo."""
    t = 8
    im = build("imhsa", rng, d_model=D, n_heads=N, landmarks=t, mix=mix)
    w = _identity_mixing(weights_of(im))
    set_weights(im, w)
    x = random_x(rng, 2, t, D)
    q, k, v = (split_heads(linear(x, *oracles.linear_weights(w, f"{p}_proj")), N) for p in "qkv")
    a = softmax(np.einsum("btnd,bsnd->bnts", q, k) / math.sqrt(d))
    o = np.einsum("bnts,bnsd->btnd", a, np.einsum("bnts,bsnd->bntd", a, v))
    want = linear(merge_heads(o), *oracles.linear_weights(w, "o_proj"))
    np.testing.assert_allclose(run(im, x), want, atol=1e-10, rtol=1e-10)
    np.testing.assert_allclose(oracles.run_oracle("imhsa", w, config_of(im), x), want, atol=1e-10, rtol=1e-10)


def test_imhsa_fresh_mixing_is_identity():
    w = weights_of(build("imhsa", None, d_model=D, n_heads=N, landmarks=4, mix="both"))
    for key, value in w.items():
        leaf = key.rsplit(".", 1)[-1]
        if leaf.startswith(("pre_mix", "post_mix")):
            np.testing.assert_array_equal(value, np.eye(N), err_msg=key)
        elif leaf.startswith(("pre_bias", "post_bias")):
            np.testing.assert_array_equal(value, np.zeros(N), err_msg=key)


def test_imhsa_pooling_matrix_segments():
    """Oracle check of the README's rank-based segments: floor(r * L / n) among real tokens."""
    real = np.array([[True] * 7 + [False] * 3, [False, True, True, False, True, True, True, True, False, True]])
    pool, lm_real = oracles.pooling_matrix(real, 3)
    np.testing.assert_allclose(pool.sum(-1), 1.0)
    # row 0: 7 real tokens -> segments floor(r*3/7) = 0,0,0,1,1,2,2
    np.testing.assert_array_equal(pool[0].argmax(0)[:7], [0, 0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(pool[0][:, 7:], 0)
    # row 1: real positions 1,2,4,5,6,7,9 (7 of them), same segments by rank
    np.testing.assert_array_equal(pool[1].argmax(0)[[1, 2, 4, 5, 6, 7, 9]], [0, 0, 0, 1, 1, 2, 2])
    pool, lm_real = oracles.pooling_matrix(real[:, :4], 5)  # fewer real tokens than landmarks
    assert lm_real[0].tolist() == [True, True, True, True, False]  # r*5//4 = 0, 1, 2, 3
    assert lm_real[1].tolist() == [True, False, True, False, False]  # 2 real tokens: r*5//2 = 0, 2


# ---------------------------------------------------------------- reuse


def _stack(layers, x, mask):
    probs = None
    for layer in layers:
        x, probs = run(layer, x, mask, prev_probs=probs)
    return x, probs


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_reuse_without_reuse_is_mha_stack(causal, rng):
    layers = [build("reuse", rng, d_model=D, n_heads=N, reuse_heads=0, causal=causal) for _ in range(3)]
    mhas = []
    for layer in layers:
        m = build("mha", None, d_model=D, n_heads=N, causal=causal)
        set_weights(m, copy_linear({}, weights_of(layer), "q", "k", "v", "o"))
        mhas.append(m)
    for mask in masks(rng, 2, 8):
        x = random_x(rng, 2, 8, D)
        want = x
        for m in mhas:
            want = run(m, want, mask)
        got, _ = _stack(layers, x, mask)
        assert_real_rows_close(got, want, mask, what="reuse P=0 stack vs mha stack")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_reuse_stack_matches_oracle_stack(causal, rng):
    """A mixed schedule P = [0, N, N, 1, 0, 3] threaded layer to layer."""
    schedule = [0, N, N, 1, 0, 3]
    layers = [build("reuse", rng, d_model=D, n_heads=N, reuse_heads=p, causal=causal) for p in schedule]
    for mask in masks(rng, 2, 7):
        x = random_x(rng, 2, 7, D)
        got, got_probs = _stack(layers, x, mask)
        want, probs = x, None
        for layer in layers:
            want, probs = oracles.run_oracle("reuse", weights_of(layer), config_of(layer), want, mask, prev_probs=probs)
        assert_real_rows_close(got, want, mask)
        assert_real_rows_close(got_probs.transpose(0, 2, 1, 3), probs.transpose(0, 2, 1, 3), mask)


def test_oracle_reuse_without_reuse_is_mha(rng):
    x = random_x(rng, 2, 6, D)
    wq, wk, wv, wo = (rng.standard_normal((D, D)) / math.sqrt(D) for _ in range(4))
    for causal in (False, True):
        y, _ = oracles.reuse(x, wq, wk, wv, wo, N, 0, causal=causal)
        np.testing.assert_allclose(y, oracles.mha(x, wq, wk, wv, wo, N, causal=causal), atol=1e-12)


# ---------------------------------------------------------------- bn / sh / bn-sh


@pytest.mark.parametrize(
    "name,opts",
    [("bn", {}), ("bn", {"rescale": False}), ("bn-sh", {}), ("bn-sh", {"sh_factors": (3, 2, 1, 2)})],
    ids=["bn", "bn-centre-only", "bn-sh", "bn-sh-factors"],
)
def test_bn_shift_invariance(name, opts, rng):
    """Adding one vector to every q and k (through their biases) leaves the output unchanged."""
    module = build(name, rng, d_model=D, n_heads=N, **opts)
    shifted = build(name, None, d_model=D, n_heads=N, **opts)
    w = weights_of(module)
    c = rng.standard_normal(D) * 3.0
    w2 = dict(w)
    w2["q_proj.bias"] = w["q_proj.bias"] + c
    w2["k_proj.bias"] = w["k_proj.bias"] + c
    set_weights(shifted, w2)
    compare_modules(module, shifted, rng, t=10, what=f"{name} shift")
    # the shift does change the oracle's q and k: the invariance is not vacuous
    x = random_x(rng, 1, 10, D)
    plain = oracles.mha(
        x,
        *(oracles.linear_weights(w, f"{p}_proj")[0] for p in "qkvo"),
        N,
        *(oracles.linear_weights(w, f"{p}_proj")[1] for p in "qkvo"),
    )
    shifted_plain = oracles.mha(
        x,
        *(oracles.linear_weights(w2, f"{p}_proj")[0] for p in "qkvo"),
        N,
        *(oracles.linear_weights(w2, f"{p}_proj")[1] for p in "qkvo"),
    )
    assert np.abs(plain - shifted_plain).max() > 1e-3


def test_sh_all_factors_one_is_mha(rng):
    sh = build("sh", rng, d_model=D, n_heads=N, sh_factors=(1,) * N)
    mha = build("mha", None, d_model=D, n_heads=N)
    set_weights(mha, copy_linear({}, weights_of(sh), "q", "k", "v", "o"))
    compare_modules(sh, mha, rng, what="sh(1,...,1) vs mha")


def test_bn_sh_all_factors_one_is_bn(rng):
    bnsh = build("bn-sh", rng, d_model=D, n_heads=N, sh_factors=(1,) * N)
    bn = build("bn", None, d_model=D, n_heads=N)
    set_weights(bn, copy_linear({}, weights_of(bnsh), "q", "k", "v", "o"))
    compare_modules(bnsh, bn, rng, what="bn-sh(1,...,1) vs bn")


def test_sh_default_factors():
    assert oracles.default_factors(4) == [1, 1, 2, 2]
    assert oracles.default_factors(5) == [1, 1, 1, 2, 2]
    assert oracles.default_factors(1) == [1]


def test_oracle_identities_pooled(rng):
    x = random_x(rng, 2, 9, D)
    ws = [rng.standard_normal((D, D)) / math.sqrt(D) for _ in range(4)]
    bs = [rng.standard_normal(D) * 0.3 for _ in range(4)]
    c = rng.standard_normal(D)
    for mask in masks(rng, 2, 9):
        kw = dict(bq=bs[0], bk=bs[1], bv=bs[2], bo=bs[3], key_padding_mask=mask)
        ref = oracles.mha(x, *ws, N, **kw)
        assert_real_rows_close(oracles.sh(x, *ws, N, factors=[1] * N, **kw), ref, mask)
        for fn, extra in ((oracles.bn, {}), (oracles.bn_sh, {"factors": [2, 3, 1, 2]})):
            a = fn(x, *ws, N, **extra, **kw)
            b = fn(x, *ws, N, **extra, **dict(kw, bq=bs[0] + c, bk=bs[1] + c))
            assert_real_rows_close(a, b, mask)


# ---------------------------------------------------------------- parameter counts


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def expected_params(name, dm, lmax, bias):
    """variants.md: mha 4 D^2, optimised 3 D^2, efficient 2 D^2, super 2 D^2 + Lmax^2 + Lmax (WA's
    weight and bias, on by default), plus one D-vector per projection with biases."""
    per = dm * dm + (dm if bias else 0)
    return {"mha": 4 * per, "optimised": 3 * per, "efficient": 2 * per, "super": 2 * per + lmax * lmax + lmax}[name]


def test_parameter_counts_d32_l32_n4():
    """variants.md's table for D = L = 32, N = 4 with biases: 4224 / 3168 / 2112 / 3168 (super's
    WA carries its 32-vector bias by default); ``wa_bias=False`` drops it: 2112 + 32*32 = 3136."""
    counts = {
        name: n_params(build(name, None, d_model=32, n_heads=4, max_len=32, bias=True))
        for name in ("mha", "optimised", "efficient", "super")
    }
    assert counts == {"mha": 4224, "optimised": 3168, "efficient": 2112, "super": 3168}
    assert n_params(build("super", None, d_model=32, n_heads=4, max_len=32, wa_bias=False)) == 3136


@pytest.mark.parametrize("bias", [True, False])
def test_parameter_count_formula(bias):
    for name in ("mha", "optimised", "efficient", "super"):
        module = build(name, None, d_model=48, n_heads=3, max_len=20, bias=bias)
        assert n_params(module) == expected_params(name, 48, 20, bias), name
