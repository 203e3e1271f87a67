"""Oracle for Attention-BN (variants.md section 8)."""

from __future__ import annotations

from .sh import pooled_norm_attention


def bn(x, wq, wk, wv, wo, n_heads, eps=1e-5, beta=1.0, rescale=True, **kw):
    """Per (batch, head, channel) key statistics over the real key tokens:
    q^ = (q - beta mu)/sqrt(var + eps), k^ likewise (rescale off: centre only); then mha."""
    return pooled_norm_attention(
        x, wq, wk, wv, wo, n_heads, factors=None, normalize=True, eps=eps, beta=beta, rescale=rescale, **kw
    )
