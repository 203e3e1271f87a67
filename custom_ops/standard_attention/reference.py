"""StandardAttention: plain masked softmax attention on [B,T,D] tensors (variants.md section 1).

o = softmax(where(allowed, q k^T * scale, NEG)) v per head in fp32, allowed = real key and, with
``causal``, s <= t + S - T (``window`` > 0: also s > t + S - T - window). A row with no allowed key
is uniform over all keys (variants.md section 0). Query head h reads kv head h // (N / Hk).
"""

from __future__ import annotations

import torch

from .._attention_math import masked_softmax, resolve_scale
from .._common import define_op


def _allowed(key_padding_mask: torch.Tensor, t: int, causal: bool, window: int) -> torch.Tensor:
    """Bool [B,1,T,S]: real keys, within the causal window when causal."""
    allowed = key_padding_mask.to(torch.bool)[:, None, None, :]
    if causal:
        s = key_padding_mask.shape[1]
        device = key_padding_mask.device
        distance = (torch.arange(t, device=device) + (s - t))[:, None] - torch.arange(s, device=device)[None, :]
        near = distance >= 0
        if window > 0:
            near = near & (distance < window)
        allowed = allowed & near
    return allowed


def standard_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor,
    num_heads: int,
    kv_num_heads: int,
    scale: float,
    causal: bool,
    window: int,
) -> torch.Tensor:
    """q [B,T,N*d], k [B,S,Hk*d], v [B,S,Hk*dv], key_padding_mask [B,S] bool -> o [B,T,N*dv]."""
    heads = num_heads
    kv_heads = kv_num_heads or heads
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3 or heads < 1 or heads % kv_heads or q.shape[2] % heads:
        raise ValueError(
            f"StandardAttention: expected q [B,T,N*d], k [B,S,Hk*d], v [B,S,Hk*dv] with Hk dividing N = {heads}, "
            f"got {list(q.shape)}, {list(k.shape)}, {list(v.shape)} and kv_num_heads {kv_num_heads}"
        )
    b, t, s = q.shape[0], q.shape[1], k.shape[1]
    d = q.shape[2] // heads
    if k.shape != (b, s, kv_heads * d) or v.shape[:2] != (b, s) or v.shape[2] % kv_heads:
        raise ValueError(f"StandardAttention: k / v do not match q: {list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    if key_padding_mask.shape != (b, s):
        raise ValueError(
            f"StandardAttention: key_padding_mask must be [B,S] = {[b, s]}, got {list(key_padding_mask.shape)}"
        )
    if window < 0 or (window > 0 and not causal):
        raise ValueError("StandardAttention: window must be >= 0, and > 0 only with causal")
    rep = heads // kv_heads
    qh = q.reshape(b, t, heads, d).transpose(1, 2)
    kh = k.reshape(b, s, kv_heads, d).transpose(1, 2).repeat_interleave(rep, dim=1)
    vh = v.reshape(b, s, kv_heads, -1).transpose(1, 2).repeat_interleave(rep, dim=1)
    logits = torch.matmul(qh, kh.transpose(-1, -2)) * resolve_scale(scale, d)
    probs = masked_softmax(logits, _allowed(key_padding_mask, t, causal, window))
    return torch.matmul(probs, vh).transpose(1, 2).reshape(b, t, -1).contiguous()


def _fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    _mask: torch.Tensor,
    num_heads: int,
    kv_num_heads: int,
    *_: object,
) -> torch.Tensor:
    kv_heads = kv_num_heads or num_heads
    return q.new_empty((q.shape[0], q.shape[1], num_heads * (v.shape[2] // kv_heads)))


standard_attention = define_op("standard_attention", standard_attention_reference, _fake)
