"""ProbAttention: softmax attention that also returns its post-softmax probabilities
(variants.md section 7, the reuse transformer's producing heads).

o = softmax(where(allowed, q k^T * scale, NEG)) v per head, with the probabilities [B,N,T,S]
as a second output so the next layer can reuse them. ``causal`` aligns the queries to the end
of the keys (query t sits at t + S - T).
"""
from __future__ import annotations

import torch

from .._attention_math import attention
from .._common import TORCH_NAMESPACE


def prob_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor, scale: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B,T,N,d], k/v [B,S,N,d], key_padding_mask [B,S] bool -> (o [B,T,N,d], probs [B,N,T,S])."""
    if q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"ProbAttention: expected q [B,T,N,d] and k, v [B,S,N,d], got {list(q.shape)}, "
                         f"{list(k.shape)}, {list(v.shape)}")
    if key_padding_mask.shape != k.shape[:2]:
        raise ValueError(f"ProbAttention: key_padding_mask must be [B,S] = {list(k.shape[:2])}, "
                         f"got {list(key_padding_mask.shape)}")
    o, probs = attention(q, k, v, key_padding_mask.to(torch.bool), scale, causal)
    return o.contiguous(), probs


@torch.library.custom_op(f"{TORCH_NAMESPACE}::prob_attention", mutates_args=())
def prob_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor, scale: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Custom op wrapper of :func:`prob_attention_reference` (one ``ai.attn2onnx::ProbAttention`` node)."""
    return prob_attention_reference(q, k, v, key_padding_mask, scale, causal)


@prob_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor, scale: float, causal: bool):
    batch, t, heads, _ = q.shape
    return torch.empty_like(q), q.new_empty((batch, heads, t, k.shape[1]))
