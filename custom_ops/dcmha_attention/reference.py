"""DcmhaAttention: the whole DCMHA attention core (variants.md section 5).

    L = q k^T * scale
    L = Compose(L, pre)                      on the *unmasked* logits
    L = where(allowed, L, NEG);  P = softmax(L)   (fp32)
    P = Compose(P, post);  o = P v

q, k, v arrive after QK-norm and RoPE (the op does neither). The per-token factors are packed
as ``q_factors [B,T,2,2R+1,N]`` / ``k_factors [B,S,2,2R+1,N]``: slot 0 feeds the pre-softmax
compose, slot 1 the post-softmax one (layout of :mod:`..dcmha_compose.reference`). The key-side
factors are exactly the per-token decode cache.

``causal`` aligns queries to the *end* of the keys (query t sits at position t + S - T), so one
decoding step with a cache of S - 1 earlier tokens is the same op. ``window`` W > 0 keeps the
keys with 0 <= (t + S - T) - s <= W - 1 (W keys including the query's own) and needs causal.
The optional ``attn_mask`` (bool, [T,S] or [B,N,T,S] with any axis 1 to broadcast; True = may
attend) is ANDed with causal / window / key padding; absent, nothing changes.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._attention_math import attention_mask, masked_softmax, resolve_scale
from .._common import define_op
from ..dcmha_compose.reference import compute_dtype, dcmha_compose_reference


def check_attn_mask(attn_mask: torch.Tensor, b: int, n: int, t: int, s: int) -> None:
    """ValueError unless ``attn_mask`` is bool [T,S] or [B,N,T,S], each axis its size or 1 (broadcast)."""
    full = (t, s) if attn_mask.dim() == 2 else (b, n, t, s)
    ok = attn_mask.dim() in (2, 4) and all(got in (1, want) for got, want in zip(attn_mask.shape, full))
    if attn_mask.dtype != torch.bool or not ok:
        raise ValueError(
            f"DCMHA: attn_mask must be a bool tensor [T,S] or [B,N,T,S] = {[b, n, t, s]} (any axis may be 1), "
            f"got {attn_mask.dtype} {list(attn_mask.shape)}"
        )


def allowed_mask(
    key_padding_mask: torch.Tensor, t: int, causal: bool, window: int, attn_mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Bool [B,1,T,S] (or [B,N,T,S] with a per-head ``attn_mask``): the causal attention mask, with
    a window W only the W most recent keys, ANDed with ``attn_mask`` where one is given."""
    if window < 0 or (window and not causal):
        raise ValueError(
            f"DCMHA: a local window must be >= 0 and needs causal attention, got window={window}, causal={causal}"
        )
    allowed = attention_mask(key_padding_mask.to(torch.bool), t, causal)
    if window:
        s = key_padding_mask.shape[-1]
        device = key_padding_mask.device
        distance = torch.arange(t, device=device)[:, None] + (s - t) - torch.arange(s, device=device)[None, :]
        allowed = allowed & (distance < window)
    return allowed if attn_mask is None else allowed & attn_mask


def dcmha_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_factors: torch.Tensor,
    k_factors: torch.Tensor,
    key_padding_mask: torch.Tensor,
    static_mix: torch.Tensor,
    scale: float,
    causal: bool,
    window: int,
    use_static_mix: bool,
    attn_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """q [B,T,N,d], k/v [B,S,N,d], factors [B,T|S,2,2R+1,N], mask [B,S], static_mix [2,N,N], optional
    attn_mask [T,S] / [B,N,T,S] (axes may be 1) -> o [B,T,N,d]."""
    if attn_mask is not None:
        check_attn_mask(attn_mask, q.shape[0], q.shape[2], q.shape[1], k.shape[1])
    dtype = compute_dtype(q)
    logits = torch.einsum("btnd,bsnd->bnts", q.to(dtype), k.to(dtype)) * resolve_scale(scale, q.shape[-1])
    logits = dcmha_compose_reference(logits, q_factors[:, :, 0], k_factors[:, :, 0], static_mix[0], use_static_mix)
    probs = masked_softmax(logits, allowed_mask(key_padding_mask, q.shape[1], causal, window, attn_mask))
    probs = dcmha_compose_reference(probs, q_factors[:, :, 1], k_factors[:, :, 1], static_mix[1], use_static_mix)
    return torch.einsum("bnts,bsnd->btnd", probs, v.to(dtype)).to(q.dtype).contiguous()  # as the fake says


def _fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *_: object) -> torch.Tensor:
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


dcmha_attention = define_op("dcmha_attention", dcmha_attention_reference, _fake)
