"""mha: standard multi-head attention, the baseline (variants.md section 1).

q, k, v = x Wq + bq, x Wk + bk, x Wv + bv split into N contiguous heads of d columns;
P_h = softmax(q_h k_h^T / sqrt(d)) (masked); y = concat_h(P_h v_h) Wo + bo.

Parameters: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` (nn.Linear, biases with ``bias``).
Plain torch ops (the shared masked-softmax attention): no custom op is needed, the graph passes
lower the exported pattern onto fused attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

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

    def cache_entries(self) -> list["CacheEntry"]:
        """What a decode step caches per layer: K and V after projection (Optimum layout)."""
        dims = ("batch", self.config.n_heads, "past", self.config.head_dim)
        return [
            CacheEntry("key", dims, "K [batch, heads, past, head_dim]"),
            CacheEntry("value", dims, "V [batch, heads, past, head_dim]"),
        ]

    def decode_step(
        self, x: torch.Tensor, key_mask: torch.Tensor, positions: torch.Tensor, cache: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """One causal decode step with explicit cache tensors (the export of ``attn2onnx export
        --decode``): x [B,T,D] new tokens, key_mask [B,P+T] bool over past and new keys,
        positions [B,T] (unused: mha has no positions of its own), cache (K, V) [B,N,P,d].
        Returns y [B,T,D] and the extended cache [B,N,P+T,d]."""
        n = self.config.n_heads
        q, k, v = (split_heads(proj(x), n) for proj in (self.q_proj, self.k_proj, self.v_proj))
        k, v = extend_cache(cache[0], k), extend_cache(cache[1], v)
        o, _ = attention(q, k, v, key_mask, causal=True)
        return self.o_proj(o.flatten(-2)), (cache_layout(k), cache_layout(v))


class CacheEntry(NamedTuple):
    """One decode-cache tensor of a layer: its name suffix (``past_key_values.{i}.<name>``), its
    dims (ints and the symbols ``batch`` and ``past``), what it holds, and ``limit``: the most
    positions it keeps (a local-window layer), None when it keeps them all."""

    name: str
    dims: tuple[int | str, ...]
    holds: str
    limit: int | None = None


def extend_cache(past: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """past [B,N,P,d] (Optimum layout) and the new tokens' new [B,T,N,d] -> [B,P+T,N,d]
    (the attention math's layout)."""
    return torch.cat([past.transpose(1, 2), new], dim=1)


def cache_layout(t: torch.Tensor) -> torch.Tensor:
    """[B,S,N,d] -> [B,N,S,d], the layout of the cache inputs and outputs."""
    return t.transpose(1, 2)


register_variant(
    VariantInfo(
        name="mha",
        config_cls=MhaConfig,
        module_cls=MultiHeadAttention,
        paper="Vaswani et al., Attention Is All You Need (NeurIPS 2017)",
        causal=True,
        params="4D^2",
        families=("lm", "encoder", "layer"),
    )
)
