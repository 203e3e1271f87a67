"""Oracle for iMHSA (variants.md section 6): attention through L pooled landmarks with dense
head mixing on the small [T,L] and [L,S] maps. Pooling follows docs/ops.md
(LandmarkAttention): real token t of rank r_t among the n_b real tokens of its row goes to
segment floor(r_t * L / n_b); an empty segment has landmark 0 and is masked out of the softmax
over L."""

from __future__ import annotations

import math

import numpy as np

from ._common import f64, linear, masked_softmax, merge_heads, padding_mask, split_heads


def pooling_matrix(key_real: np.ndarray, landmarks: int, grid: int = 0):
    """Masked-mean pooling as a [B, L, T] averaging matrix, plus landmark_real [B, L].

    grid = 0: 1-D rank-based segments (see module docstring).
    grid = s > 0: L = s*s; T = side*side is a row-major square map; token (i, j) goes to cell
    (floor(i*s/side), floor(j*s/side)); padded tokens are left out of the mean."""
    b, t = key_real.shape
    if grid:
        side = math.isqrt(t)
        assert side * side == t, f"grid pooling needs a square map, got T = {t}"
        rows, cols = np.divmod(np.arange(t), side)
        cell = (rows * grid // side) * grid + cols * grid // side
        seg = np.broadcast_to(cell, (b, t))
        landmarks = grid * grid
    else:
        rank = np.cumsum(key_real, axis=1) - 1
        n = np.maximum(key_real.sum(axis=1, keepdims=True), 1)
        seg = rank * landmarks // n
    member = (seg[:, None, :] == np.arange(landmarks)[None, :, None]) & key_real[:, None, :]
    count = member.sum(axis=2)
    pool = member / np.maximum(count, 1)[..., None]
    return pool.astype(np.float64), count > 0


def _mix(s, m, c):
    """s [B,N,X,Y] -> sum_h M[g,h] s[h] + c[g] (dense mixing over the head axis)."""
    return np.einsum("gh,bhxy->bgxy", f64(m), s) + f64(c)[None, :, None, None]


def imhsa(
    x,
    wq,
    wk,
    wv,
    wo,
    n_heads,
    landmarks,
    bq=None,
    bk=None,
    bv=None,
    bo=None,
    grid=0,
    mix="pre",
    pre_mix_q=None,
    pre_bias_q=None,
    pre_mix_k=None,
    pre_bias_k=None,
    post_mix_q=None,
    post_bias_q=None,
    post_mix_k=None,
    post_bias_k=None,
    key_padding_mask=None,
):
    """y = concat(A_Q (A_K v)) Wo + bo with
    S_Q = q k~^T / sqrt(d) [B,N,T,L], S_K = q~ k^T / sqrt(d) [B,N,L,S];
    pre: S' = M S + c (per map) before softmax; A_Q = softmax over L (empty landmarks masked),
    A_K = softmax over S (padded keys masked); post: A' = M A + c after softmax, then masked
    entries are set back to 0 (so padding never leaks in through the post bias). Not causal."""
    assert mix in ("pre", "post", "both"), mix
    x = f64(x)
    b, t, _ = x.shape
    n = n_heads
    eye, zero = np.eye(n), np.zeros(n)
    key_real = padding_mask(key_padding_mask, b, t)
    q = split_heads(linear(x, f64(wq), f64(bq)), n)
    k = split_heads(linear(x, f64(wk), f64(bk)), n)
    v = split_heads(linear(x, f64(wv), f64(bv)), n)
    scale = 1.0 / math.sqrt(q.shape[-1])
    pool, lm_real = pooling_matrix(key_real, landmarks, grid)
    q_lm = np.einsum("blt,btnd->blnd", pool, q)
    k_lm = np.einsum("blt,btnd->blnd", pool, k)
    s_q = np.einsum("btnd,blnd->bntl", q, k_lm) * scale
    s_k = np.einsum("blnd,bsnd->bnls", q_lm, k) * scale
    if mix in ("pre", "both"):
        s_q = _mix(s_q, eye if pre_mix_q is None else pre_mix_q, zero if pre_bias_q is None else pre_bias_q)
        s_k = _mix(s_k, eye if pre_mix_k is None else pre_mix_k, zero if pre_bias_k is None else pre_bias_k)
    q_allowed = lm_real[:, None, None, :]
    k_allowed = key_real[:, None, None, :]
    a_q = masked_softmax(s_q, q_allowed)
    a_k = masked_softmax(s_k, k_allowed)
    if mix in ("post", "both"):
        a_q = _mix(a_q, eye if post_mix_q is None else post_mix_q, zero if post_bias_q is None else post_bias_q)
        a_k = _mix(a_k, eye if post_mix_k is None else post_mix_k, zero if post_bias_k is None else post_bias_k)
        a_q = a_q * q_allowed
        a_k = a_k * k_allowed
    lv = np.einsum("bnls,bsnd->bnld", a_k, v)  # right to left: never T x S
    o = np.einsum("bntl,bnld->btnd", a_q, lv)
    return linear(merge_heads(o), f64(wo), f64(bo))
