"""ProbAttention: softmax attention that also returns its post-softmax probabilities
(variants.md section 7, the reuse transformer's producing heads).

o = softmax(where(allowed, q k^T * scale, NEG)) v per head, with the probabilities [B,N,T,S]
as a second output so the next layer can reuse them. ``causal`` aligns the queries to the end
of the keys (query t sits at t + S - T).
"""

from __future__ import annotations

import torch

from .._attention_math import attention
from .._common import check_attention_inputs, define_op


def prob_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor, scale: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B,T,N,d], k/v [B,S,N,d], key_padding_mask [B,S] bool -> (o [B,T,N,d], probs [B,N,T,S])."""
    check_attention_inputs("ProbAttention", q, k, v, key_padding_mask)
    o, probs = attention(q, k, v, key_padding_mask.to(torch.bool), scale, causal)
    return o.contiguous(), probs


def _fake(q: torch.Tensor, k: torch.Tensor, *_: object) -> tuple[torch.Tensor, torch.Tensor]:
    batch, t, heads = q.shape[:3]
    return torch.empty_like(q), q.new_empty((batch, heads, t, k.shape[1]))


prob_attention = define_op("prob_attention", prob_attention_reference, _fake)
