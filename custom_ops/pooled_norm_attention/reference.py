"""PooledNormAttention: Attention-BN, Attention-SH and BN+SH (variants.md sections 8-10).

SH: head h average-pools its keys and values along tokens by its factor r_h (kernel = stride =
r_h, the last window partial; a masked mean over the real tokens, and a pooled window is real
iff it holds one). Queries are not pooled, so the output keeps T tokens. Heads with equal
factors are computed together and put back in the original head order.

BN (after the pooling for BN+SH): per (batch, head, channel) the mean and population variance
of that head's keys over its real (pooled) key tokens; q^ = (q - beta mu) / sqrt(var + eps),
k^ = (k - beta mu) / sqrt(var + eps) (rescale off: centre only). No running statistics.
Then standard masked softmax attention on (q^, k^, v). Not causal.
"""

from __future__ import annotations

import torch

from .._attention_math import attention, masked_moments, window_pool
from .._common import check_attention_inputs, define_op, empty_like_first


def pooled_norm_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor,
    factors: list[int],
    normalize: bool,
    eps: float,
    beta: float,
    rescale: bool,
    scale: float,
) -> torch.Tensor:
    """q [B,T,N,d], k/v [B,S,N,d], key_padding_mask [B,S] bool, factors (one int >= 1 per head)
    -> o [B,T,N,d]."""
    check_attention_inputs("PooledNormAttention", q, k, v, key_padding_mask)
    factors = [int(f) for f in factors]
    if len(factors) != q.shape[2] or min(factors) < 1:
        raise ValueError(
            f"PooledNormAttention: factors must be one integer >= 1 per head ({q.shape[2]}), got {factors}"
        )
    mask = key_padding_mask.to(torch.bool)
    outputs: list[torch.Tensor | None] = [None] * len(factors)
    for factor in sorted(set(factors)):
        heads = [h for h, f in enumerate(factors) if f == factor]
        # Heads gathered by slicing (no index tensor), so the reference decomposes into a
        # purely functional aten graph for the stock export path.
        qg, kg, vg = (torch.stack([t[:, :, h] for h in heads], dim=2) for t in (q, k, v))
        kg, group_mask = window_pool(kg, mask, factor)
        vg, _ = window_pool(vg, mask, factor)
        if normalize:
            mu, var = masked_moments(kg, group_mask)
            qg, kg = qg - beta * mu, kg - beta * mu
            if rescale:
                std = torch.sqrt(var + eps)
                qg, kg = qg / std, kg / std
        group_out = attention(qg, kg, vg, group_mask, scale, causal=False)[0]
        for i, h in enumerate(heads):
            outputs[h] = group_out[:, :, i]
    return torch.stack(outputs, dim=2)


pooled_norm_attention = define_op("pooled_norm_attention", pooled_norm_attention_reference, empty_like_first)
