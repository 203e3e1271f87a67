"""mha: standard multi-head attention, the baseline (variants.md section 1).

q, k, v = x Wq + bq, x Wk + bk, x Wv + bv split into N contiguous heads of d columns;
P_h = softmax(q_h k_h^T / sqrt(d)) (masked); y = concat_h(P_h v_h) Wo + bo.

Parameters: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` (nn.Linear, biases with ``bias``).
Plain torch ops (the shared masked-softmax attention): no custom op is needed, the graph passes
lower the exported pattern onto fused attention.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..custom_ops._attention_math import attention
from .base import AttentionConfig, VariantInfo, check_input, register_variant, split_heads


@dataclass
class MhaConfig(AttentionConfig):
    """Standard multi-head attention has no options beyond :class:`AttentionConfig`."""


class MultiHeadAttention(nn.Module):
    """forward(x [B,T,D], key_padding_mask [B,T] bool | None = None) -> y [B,T,D]."""

    def __init__(self, config: MhaConfig) -> None:
        super().__init__()
        self.config = config
        d_model = config.d_model
        self.q_proj = nn.Linear(d_model, d_model, bias=config.bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=config.bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=config.bias)
        self.o_proj = nn.Linear(d_model, d_model, bias=config.bias)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = check_input(x, key_padding_mask, self.config.d_model)
        n = self.config.n_heads
        q, k, v = (split_heads(proj(x), n) for proj in (self.q_proj, self.k_proj, self.v_proj))
        o, _ = attention(q, k, v, mask, causal=self.config.causal)
        return self.o_proj(o.flatten(-2))


register_variant(VariantInfo(
    name="mha",
    config_cls=MhaConfig,
    module_cls=MultiHeadAttention,
    paper="Vaswani et al., Attention Is All You Need (NeurIPS 2017)",
    causal=True,
    params="4D^2",
    families=("lm", "encoder", "layer"),
))
