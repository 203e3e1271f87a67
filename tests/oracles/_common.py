"""Shared float64 numpy building blocks for the oracles (variants.md, notation section).

Conventions (math, not nn.Linear): a projection weight W is [in, out] and y = x @ W + b.
Activations are [B, T, D]; heads are contiguous column blocks: [B, T, N, d].
Probabilities are [B, N, T, S]. Masks are boolean "allowed" arrays (True = real / visible).
"""

from __future__ import annotations

import math

import numpy as np

# Masked logits are *replaced* by a large finite negative (never -inf, never added as a bias).
# finfo(float64).min would overflow to -inf in `z - max`; -1e300 gives the same softmax.
NEG = -1e300


def f64(a) -> np.ndarray | None:
    return None if a is None else np.asarray(a, dtype=np.float64)


def linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """x @ W (+ b), W in math convention [in, out]."""
    y = x @ w
    return y if b is None else y + b


def split_heads(t: np.ndarray, n_heads: int) -> np.ndarray:
    """[B,T,N*d] -> [B,T,N,d]."""
    return t.reshape(*t.shape[:-1], n_heads, t.shape[-1] // n_heads)


def merge_heads(o: np.ndarray) -> np.ndarray:
    """[B,T,N,d] -> [B,T,N*d]."""
    return o.reshape(*o.shape[:-2], o.shape[-2] * o.shape[-1])


def padding_mask(key_padding_mask, batch: int, length: int) -> np.ndarray:
    """[B,S] bool, all true when None."""
    if key_padding_mask is None:
        return np.ones((batch, length), dtype=bool)
    m = np.asarray(key_padding_mask, dtype=bool)
    assert m.shape == (batch, length), (m.shape, batch, length)
    return m


def allowed_mask(
    key_real: np.ndarray, t_len: int, causal: bool = False, window: int = 0, attn_mask: np.ndarray | None = None
) -> np.ndarray:
    """[B,1,T,S] bool: key s is real, and (causal) s <= t + (S - T), and (window W) the query
    sees at most W keys ending at itself: 0 <= (t + S - T) - s <= W - 1; and where an
    ``attn_mask`` (bool, broadcastable to [B,N,T,S]) is given, it too ([B,N,T,S] then)."""
    b, s_len = key_real.shape
    allowed = np.broadcast_to(key_real[:, None, None, :], (b, 1, t_len, s_len)).copy()
    t_abs = np.arange(t_len)[:, None] + (s_len - t_len)
    s_idx = np.arange(s_len)[None, :]
    if causal:
        allowed &= (s_idx <= t_abs)[None, None]
    if window:
        allowed &= (t_abs - s_idx <= window - 1)[None, None]
    return allowed if attn_mask is None else allowed & attn_mask


def softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def masked_softmax(z: np.ndarray, allowed: np.ndarray | None, axis: int = -1) -> np.ndarray:
    """softmax(where(allowed, z, NEG)) (a fully masked row comes out uniform, as with NEG)."""
    if allowed is not None:
        z = np.where(allowed, z, NEG)
    return softmax(z, axis=axis)


def logits(q: np.ndarray, k: np.ndarray, scale: float | None = None) -> np.ndarray:
    """q [B,T,N,d], k [B,S,N,d] -> [B,N,T,S] = q k^T * scale (default 1/sqrt(d))."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return np.einsum("btnd,bsnd->bnts", q, k) * scale


def apply_probs(p: np.ndarray, v: np.ndarray) -> np.ndarray:
    """p [B,N,T,S], v [B,S,N,d] -> o [B,T,N,d]."""
    return np.einsum("bnts,bsnd->btnd", p, v)


def attend(q, k, v, allowed, scale=None):
    """Standard softmax attention; returns (o [B,T,N,d], P [B,N,T,S])."""
    p = masked_softmax(logits(q, k, scale), allowed)
    return apply_probs(p, v), p


_erf = np.vectorize(math.erf, otypes=[np.float64])


def gelu(x: np.ndarray, approx: str = "none") -> np.ndarray:
    """Exact (erf) GELU; approx="tanh" gives the tanh form."""
    if approx == "tanh":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    assert approx == "none", approx
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def rms_norm(x: np.ndarray, gain: np.ndarray | None, eps: float = 1e-6) -> np.ndarray:
    """RMS over the last axis, eps inside the root, optional gain."""
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return y if gain is None else y * gain


def rope(x: np.ndarray, positions: np.ndarray, base: float = 10000.0, fraction: float = 1.0) -> np.ndarray:
    """Rotate-half RoPE on the first int(d * fraction) channels (rounded down to even) of x [B,T,N,d].

    positions [T] (absolute token positions). Frequencies base^(-2i/rd), i < rd/2; the rotated
    block is x_rot * cos + rotate_half(x_rot) * sin with rotate_half([a, b]) = [-b, a].
    """
    d = x.shape[-1]
    rd = int(d * fraction) // 2 * 2
    if rd == 0:
        return x
    inv_freq = base ** (-np.arange(0, rd, 2, dtype=np.float64) / rd)  # [rd/2]
    ang = np.asarray(positions, dtype=np.float64)[:, None] * inv_freq[None, :]  # [T, rd/2]
    cos = np.concatenate([np.cos(ang), np.cos(ang)], axis=-1)[None, :, None, :]
    sin = np.concatenate([np.sin(ang), np.sin(ang)], axis=-1)[None, :, None, :]
    xr, xp = x[..., :rd], x[..., rd:]
    half = rd // 2
    rot = np.concatenate([-xr[..., half:], xr[..., :half]], axis=-1)
    return np.concatenate([xr * cos + rot * sin, xp], axis=-1)
