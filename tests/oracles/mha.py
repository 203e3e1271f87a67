"""Oracle for mha (variants.md section 1)."""

from __future__ import annotations

from ._common import allowed_mask, attend, f64, linear, merge_heads, padding_mask, split_heads


def mha(x, wq, wk, wv, wo, n_heads, bq=None, bk=None, bv=None, bo=None, key_padding_mask=None, causal=False):
    """y = concat_h(softmax(q_h k_h^T / sqrt(d)) v_h) Wo + bo with q, k, v = x W + b.

    Weights in math convention ([in, out]); biases optional. Returns y [B,T,D].
    """
    x = f64(x)
    b, t, _ = x.shape
    q = split_heads(linear(x, f64(wq), f64(bq)), n_heads)
    k = split_heads(linear(x, f64(wk), f64(bk)), n_heads)
    v = split_heads(linear(x, f64(wv), f64(bv)), n_heads)
    allowed = allowed_mask(padding_mask(key_padding_mask, b, t), t, causal)
    o, _ = attend(q, k, v, allowed)
    return linear(merge_heads(o), f64(wo), f64(bo))
