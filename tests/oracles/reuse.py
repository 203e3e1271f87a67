"""Oracle for the Reuse Transformer layer (variants.md section 7)."""

from __future__ import annotations

import numpy as np

from ._common import allowed_mask, apply_probs, attend, f64, linear, merge_heads, padding_mask, split_heads


def reuse(
    x,
    wq,
    wk,
    wv,
    wo,
    n_heads,
    reuse_heads,
    prev_probs=None,
    bq=None,
    bk=None,
    bv=None,
    bo=None,
    key_padding_mask=None,
    causal=False,
):
    """One layer with P = reuse_heads reused heads. Returns (y [B,T,D], probs [B,N,T,S]).

    wq, wk [D, (N-P) d] (None when P = N); wv [D, N d], new heads' columns first, then the P
    reused heads'; wo [N d, D] in the same head order, so
    y = concat(A_new v_new) Wo_new + concat(R v_reuse) Wo_reuse + bo,
    R = prev_probs[:, :P] used verbatim; probs = concat(A_new, R) on the head axis."""
    x = f64(x)
    b, t, _ = x.shape
    n, p = n_heads, reuse_heads
    assert 0 <= p <= n
    v = split_heads(linear(x, f64(wv), f64(bv)), n)
    parts = []
    if p < n:
        q = split_heads(linear(x, f64(wq), f64(bq)), n - p)
        k = split_heads(linear(x, f64(wk), f64(bk)), n - p)
        allowed = allowed_mask(padding_mask(key_padding_mask, b, t), t, causal)
        _, a_new = attend(q, k, v[:, :, : n - p], allowed)
        parts.append(a_new)
    if p > 0:
        assert prev_probs is not None, "a reusing layer needs the previous layer's probabilities"
        parts.append(f64(prev_probs)[:, :p])
    probs = np.concatenate(parts, axis=1)
    o = apply_probs(probs, v)
    return linear(merge_heads(o), f64(wo), f64(bo)), probs
