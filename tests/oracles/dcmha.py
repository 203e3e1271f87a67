"""Oracle for DCMHA (variants.md section 5), full forward and step-by-step decode with a cache."""

from __future__ import annotations

import numpy as np

from ._common import (
    allowed_mask,
    apply_probs,
    f64,
    gelu,
    linear,
    logits,
    masked_softmax,
    merge_heads,
    padding_mask,
    rms_norm,
    rope,
    split_heads,
)

U_EPS = 1e-6  # RMS over heads of each U row (no gain)


def dynamic_factors(x, dw1, qkw, dd, gelu_approx="none"):
    """Per-token dynamic weights for the four slots c (0 pre/query, 1 pre/key, 2 post/query,
    3 post/key). x [B,T,D], dw1 [D,4,K], qkw [4,K,2R,N], dd [D,4N].

    Returns U [B,T,4,R,N] (each row RMS-normalised over heads), V [B,T,4,R,N], g [B,T,4,N]."""
    x, dw1, qkw, dd = f64(x), f64(dw1), f64(qkw), f64(dd)
    n = qkw.shape[-1]
    r = qkw.shape[2] // 2
    assert dw1.shape[1] == 4 and qkw.shape[0] == 4 and dd.shape[1] == 4 * n
    h = gelu(np.einsum("btd,dck->btck", x, dw1), gelu_approx)
    z = np.einsum("btck,ckrn->btcrn", h, qkw)
    u, v = z[..., :r, :], z[..., r:, :]
    u = u / np.sqrt(np.mean(u * u, axis=-1, keepdims=True) + U_EPS)
    g = np.tanh(x @ dd).reshape(*x.shape[:2], 4, n)
    return u, v, g


def compose(a, uq, vq, gq, uk, vk, gk, wb=None):
    """Compose on the head vector a = A[b,:,t,s] of A [B,N,T,S]:
    a' = a + (a Uq_t^T) Vq_t + (a Uk_s^T) Vk_s + a*gq_t + a*gk_s (+ a Wb).
    uq, vq [B,T,R,N], gq [B,T,N] (query side, by t); uk, vk [B,S,R,N], gk [B,S,N] (by s)."""
    out = a.copy()
    out += np.einsum("brts,btrm->bmts", np.einsum("bnts,btrn->brts", a, uq), vq)
    out += np.einsum("brts,bsrm->bmts", np.einsum("bnts,bsrn->brts", a, uk), vk)
    out += a * np.transpose(gq, (0, 2, 1))[:, :, :, None]
    out += a * np.transpose(gk, (0, 2, 1))[:, :, None, :]
    if wb is not None:
        out += np.einsum("bnts,nm->bmts", a, wb)
    return out


def _qkv(
    x,
    n_heads,
    wq,
    wk,
    wv,
    bq,
    bk,
    bv,
    q_norm_gain,
    k_norm_gain,
    qk_norm,
    use_rope,
    rope_base,
    rotary_fraction,
    positions,
):
    q = split_heads(linear(x, f64(wq), f64(bq)), n_heads)
    k = split_heads(linear(x, f64(wk), f64(bk)), n_heads)
    v = split_heads(linear(x, f64(wv), f64(bv)), n_heads)
    if qk_norm:
        q = rms_norm(q, f64(q_norm_gain))
        k = rms_norm(k, f64(k_norm_gain))
    if use_rope:
        q = rope(q, positions, rope_base, rotary_fraction)
        k = rope(k, positions, rope_base, rotary_fraction)
    return q, k, v


def _core(q, k, v, fq, fk, allowed, static_mix):
    """fq = (U, V, g) of the query tokens, fk of the key tokens, both in dynamic_factors' layout."""
    (uq, vq, gq), (uk, vk, gk) = fq, fk
    wb0 = wb1 = None
    if static_mix is not None:
        wb0, wb1 = f64(static_mix)[0], f64(static_mix)[1]
    lg = logits(q, k)
    lg = compose(lg, uq[:, :, 0], vq[:, :, 0], gq[:, :, 0], uk[:, :, 1], vk[:, :, 1], gk[:, :, 1], wb0)
    p = masked_softmax(lg, allowed)  # mask applied only *after* the pre-compose
    p = compose(p, uq[:, :, 2], vq[:, :, 2], gq[:, :, 2], uk[:, :, 3], vk[:, :, 3], gk[:, :, 3], wb1)
    return apply_probs(p, v)


def dcmha(
    x,
    wq,
    wk,
    wv,
    wo,
    dw1,
    qkw,
    dd,
    n_heads,
    bq=None,
    bk=None,
    bv=None,
    bo=None,
    q_norm_gain=None,
    k_norm_gain=None,
    qk_norm=False,
    use_rope=False,
    rope_base=10000.0,
    rotary_fraction=1.0,
    static_mix=None,
    key_padding_mask=None,
    causal=False,
    window=0,
    gelu_approx="none",
):
    """Full-sequence DCMHA layer. ``static_mix`` [2,N,N] (pre, post) or None (off).

    q,k,v -> optional QK-norm -> optional RoPE (positions 0..T-1) -> L = q k^T/sqrt(d) ->
    pre-Compose (slots 0,1) on unmasked logits -> mask -> softmax -> post-Compose (2,3) -> P v -> Wo."""
    x = f64(x)
    b, t, _ = x.shape
    q, k, v = _qkv(
        x,
        n_heads,
        wq,
        wk,
        wv,
        bq,
        bk,
        bv,
        q_norm_gain,
        k_norm_gain,
        qk_norm,
        use_rope,
        rope_base,
        rotary_fraction,
        np.arange(t),
    )
    f = dynamic_factors(x, dw1, qkw, dd, gelu_approx)
    allowed = allowed_mask(padding_mask(key_padding_mask, b, t), t, causal, window)
    o = _core(q, k, v, f, f, allowed, static_mix)
    return linear(merge_heads(o), f64(wo), f64(bo))


def dcmha_decode(
    x,
    wq,
    wk,
    wv,
    wo,
    dw1,
    qkw,
    dd,
    n_heads,
    bq=None,
    bk=None,
    bv=None,
    bo=None,
    q_norm_gain=None,
    k_norm_gain=None,
    qk_norm=False,
    use_rope=False,
    rope_base=10000.0,
    rotary_fraction=1.0,
    static_mix=None,
    key_padding_mask=None,
    window=0,
    gelu_approx="none",
):
    """Causal step-by-step decoding, one token at a time, with a cache holding per position K, V
    and only the key-side factors (U, V, g of slots 1 and 3: 10N numbers per token at R = 2).
    Returns y [B,T,D] (row t computed from tokens 0..t only)."""
    x = f64(x)
    b, t_len, _ = x.shape
    real = padding_mask(key_padding_mask, b, t_len)
    cache_k, cache_v, cache_f = [], [], []
    rows = []
    for t in range(t_len):
        xt = x[:, t : t + 1]
        q, k, v = _qkv(
            xt,
            n_heads,
            wq,
            wk,
            wv,
            bq,
            bk,
            bv,
            q_norm_gain,
            k_norm_gain,
            qk_norm,
            use_rope,
            rope_base,
            rotary_fraction,
            np.array([t]),
        )
        u, vv, g = dynamic_factors(xt, dw1, qkw, dd, gelu_approx)
        cache_k.append(k)
        cache_v.append(v)
        cache_f.append((u[:, :, [1, 3]], vv[:, :, [1, 3]], g[:, :, [1, 3]]))  # key side only
        keys, vals = np.concatenate(cache_k, 1), np.concatenate(cache_v, 1)
        ku, kv, kg = (np.concatenate([c[i] for c in cache_f], 1) for i in range(3))
        # re-expand to 4 slots so _core indexes them like the full forward (slots 0/2 unused)
        fk = tuple(np.stack([z[:, :, 0], z[:, :, 0], z[:, :, 1], z[:, :, 1]], axis=2) for z in (ku, kv, kg))
        allowed = allowed_mask(real[:, : t + 1], 1, causal=True, window=window)
        o = _core(q, keys, vals, (u, vv, g), fk, allowed, static_mix)
        rows.append(linear(merge_heads(o), f64(wo), f64(bo)))
    return np.concatenate(rows, axis=1)
