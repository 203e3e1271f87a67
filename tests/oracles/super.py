"""Oracle for super attention (variants.md section 4): efficient + learned token mixing WA."""

from __future__ import annotations

import numpy as np

from ._common import allowed_mask, attend, f64, linear, merge_heads, padding_mask, split_heads


def super_mix(x, wa, key_padding_mask=None, causal=False, tril=True):
    """U = (tril if causal)(WA[:T,:T]) @ (x with padded rows zeroed); x [B,T,D] -> U [B,T,D].

    ``tril=False`` drops the lower-triangle mask even when causal: the deliberately *wrong*
    layer the leakage tests use to show that they can fail.
    """
    x, wa = f64(x), f64(wa)
    b, t, _ = x.shape
    if t > wa.shape[0]:
        raise ValueError(f"T = {t} exceeds Lmax = {wa.shape[0]}")
    mix = wa[:t, :t]
    if causal and tril:
        mix = np.tril(mix)
    xz = x * padding_mask(key_padding_mask, b, t)[..., None]
    return np.einsum("ts,bsd->btd", mix, xz)


def super_attention(
    x, wq, wo, wa, n_heads, bq=None, bo=None, key_padding_mask=None, causal=False, tril=True, wa_bias=None
):
    """P_i = softmax((x Wq + bq)_i X_i^T / sqrt(d)) (keys: raw x); U = super_mix(x) + wa_bias[:T]
    (the bias broadcast over features, None = no bias), padded rows of U re-zeroed;
    y = concat_i(P_i U_i) Wo + bo."""
    x = f64(x)
    b, t, _ = x.shape
    real = padding_mask(key_padding_mask, b, t)
    q = split_heads(linear(x, f64(wq), f64(bq)), n_heads)
    keys = split_heads(x, n_heads)
    u = super_mix(x, wa, key_padding_mask, causal, tril)
    if wa_bias is not None:
        u = u + f64(wa_bias)[:t, None]
    u = split_heads(u * real[..., None], n_heads)
    allowed = allowed_mask(real, t, causal)
    o, _ = attend(q, keys, u, allowed)
    return linear(merge_heads(o), f64(wo), f64(bo))
