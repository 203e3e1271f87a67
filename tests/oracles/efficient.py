"""Oracle for efficient attention (variants.md section 3): no Wv, no Wk."""

from __future__ import annotations

from ._common import allowed_mask, attend, f64, linear, merge_heads, padding_mask, split_heads


def efficient(x, wq, wo, n_heads, bq=None, bo=None, key_padding_mask=None, causal=False):
    """P_i = softmax((x Wq + bq)_i X_i^T / sqrt(d)); y = concat_i(P_i X_i) Wo + bo."""
    x = f64(x)
    b, t, _ = x.shape
    q = split_heads(linear(x, f64(wq), f64(bq)), n_heads)
    xs = split_heads(x, n_heads)
    allowed = allowed_mask(padding_mask(key_padding_mask, b, t), t, causal)
    o, _ = attend(q, xs, xs, allowed)
    return linear(merge_heads(o), f64(wo), f64(bo))
