"""Oracle for optimised attention (variants.md section 2): no Wv, values are raw column slices."""

from __future__ import annotations

from ._common import allowed_mask, attend, f64, linear, merge_heads, padding_mask, split_heads


def optimised(x, wq, wk, wo, n_heads, bq=None, bk=None, bo=None, key_padding_mask=None, causal=False):
    """P_i = softmax((x Wq + bq)_i (x Wk + bk)_i^T / sqrt(d)); y = concat_i(P_i X_i) Wo + bo."""
    x = f64(x)
    b, t, _ = x.shape
    q = split_heads(linear(x, f64(wq), f64(bq)), n_heads)
    k = split_heads(linear(x, f64(wk), f64(bk)), n_heads)
    v = split_heads(x, n_heads)  # X_i = x[..., i*d:(i+1)*d]
    allowed = allowed_mask(padding_mask(key_padding_mask, b, t), t, causal)
    o, _ = attend(q, k, v, allowed)
    return linear(merge_heads(o), f64(wo), f64(bo))
