"""Oracles for Attention-BN / -SH / -BN+SH (variants.md sections 8-10): one shared core."""

from __future__ import annotations

import math

import numpy as np

from ._common import attend, f64, linear, merge_heads, padding_mask, split_heads


def default_factors(n_heads: int) -> list[int]:
    """First ceil(N/2) heads 1, the rest 2."""
    first = -(-n_heads // 2)
    return [1] * first + [2] * (n_heads - first)


def pool_tokens(t: np.ndarray, real: np.ndarray, r: int):
    """Average-pool t [B,S,d] along tokens, kernel = stride = r, last window partial; the mean
    runs over the window's real tokens. Returns (pooled [B,ceil(S/r),d], window_real [B,ceil(S/r)])."""
    b, s, d = t.shape
    w = -(-s // r)
    pad = w * r - s
    tp = np.concatenate([t, np.zeros((b, pad, d))], axis=1).reshape(b, w, r, d)
    rp = np.concatenate([real, np.zeros((b, pad), dtype=bool)], axis=1).reshape(b, w, r)
    count = rp.sum(axis=2)
    pooled = (tp * rp[..., None]).sum(axis=2) / np.maximum(count, 1)[..., None]
    return pooled, count > 0


def key_norm(q, k, real, eps, beta, rescale):
    """BN: per channel statistics of k [B,S,d] over its real tokens; returns (q^, k^)."""
    w = real[..., None].astype(np.float64)
    n = np.maximum(w.sum(axis=1, keepdims=True), 1)
    mu = (k * w).sum(axis=1, keepdims=True) / n
    var = (((k - mu) ** 2) * w).sum(axis=1, keepdims=True) / n
    qh, kh = q - beta * mu, k - beta * mu
    if rescale:
        qh, kh = qh / np.sqrt(var + eps), kh / np.sqrt(var + eps)
    return qh, kh


def pooled_norm_attention(
    x,
    wq,
    wk,
    wv,
    wo,
    n_heads,
    factors=None,
    normalize=False,
    eps=1e-5,
    beta=1.0,
    rescale=True,
    bq=None,
    bk=None,
    bv=None,
    bo=None,
    key_padding_mask=None,
):
    """Per head h: pool k, v by factors[h] (SH), then optionally BN with the statistics of the
    (pooled) real keys, then softmax attention with scale 1/sqrt(d). Queries are never pooled."""
    x = f64(x)
    b, t, _ = x.shape
    n = n_heads
    factors = [1] * n if factors is None else list(factors)
    assert len(factors) == n
    real = padding_mask(key_padding_mask, b, t)
    q = split_heads(linear(x, f64(wq), f64(bq)), n)
    k = split_heads(linear(x, f64(wk), f64(bk)), n)
    v = split_heads(linear(x, f64(wv), f64(bv)), n)
    scale = 1.0 / math.sqrt(q.shape[-1])
    outs = []
    for h, r in enumerate(factors):
        qh, kh, vh, kreal = q[:, :, h], k[:, :, h], v[:, :, h], real
        if r > 1:
            kh, kreal = pool_tokens(kh, real, r)
            vh, _ = pool_tokens(vh, real, r)
        if normalize:
            qh, kh = key_norm(qh, kh, kreal, eps, beta, rescale)
        o, _ = attend(qh[:, :, None], kh[:, :, None], vh[:, :, None], kreal[:, None, None, :], scale)
        outs.append(o)
    o = np.concatenate(outs, axis=2)
    return linear(merge_heads(o), f64(wo), f64(bo))


def sh(x, wq, wk, wv, wo, n_heads, factors=None, **kw):
    """Attention-SH; factors default to variants.md's (first ceil(N/2) heads 1, the rest 2)."""
    factors = default_factors(n_heads) if factors is None else factors
    return pooled_norm_attention(x, wq, wk, wv, wo, n_heads, factors=factors, normalize=False, **kw)
