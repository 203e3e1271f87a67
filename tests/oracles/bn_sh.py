"""Oracle for Attention-BN+SH (variants.md section 10): pool first (SH), then BN with the
statistics of that head's pooled real keys."""

from __future__ import annotations

from .sh import default_factors, pooled_norm_attention


def bn_sh(x, wq, wk, wv, wo, n_heads, factors=None, eps=1e-5, beta=1.0, rescale=True, **kw):
    factors = default_factors(n_heads) if factors is None else factors
    return pooled_norm_attention(
        x, wq, wk, wv, wo, n_heads, factors=factors, normalize=True, eps=eps, beta=beta, rescale=rescale, **kw
    )
