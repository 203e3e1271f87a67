"""reuse: the Reuse Transformer layer (variants.md section 7; Bhojanapalli et al., 2021).

Layers pass their post-softmax probabilities [B,N,T,S] on. A layer with ``reuse_heads`` P:

- N - P new heads with their own queries and keys: A_new = softmax(q k^T / sqrt(d)) (masked),
  computed by the ``ai.attn2onnx`` ProbAttention op, which also returns A_new;
- P reused heads: R = prev_probs[:, :P] used verbatim (no projections, no mixing), applied to
  their own values with a plain matmul R v_reuse;
- y = concat(A_new v_new, R v_reuse) Wo + bo; probabilities passed on: concat(A_new, R) on the
  head axis (fresh heads first); with P = N the previous tensor itself.

Parameters: ``q_proj``, ``k_proj`` [D -> (N-P) d] (absent when P = N), ``v_proj`` [D -> N d]
(the new heads' columns first, then the reused ones'), ``o_proj`` [N d -> D], in that head
order. Causal works (reused maps are already causal).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..custom_ops import torch_ops  # noqa: F401  (registers torch.ops.attn2onnx.prob_attention)
from .base import AttentionConfig, VariantError, VariantInfo, check_input, register_variant, split_heads
from .mha import CacheEntry, cache_layout, extend_cache


@dataclass
class ReuseConfig(AttentionConfig):
    """``reuse_heads`` P in [0, N]: heads that reuse the previous layer's probabilities."""

    reuse_heads: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.reuse_heads <= self.n_heads:
            raise VariantError(f"reuse: reuse_heads must be in [0, {self.n_heads}], got {self.reuse_heads}")


class ReuseAttention(nn.Module):
    """forward(x [B,T,D], key_padding_mask [B,T] bool | None = None,
    prev_probs [B,N',T,T] | None = None) -> (y [B,T,D], probs [B,N,T,T]); N' >= reuse_heads."""

    passes_probs = True

    def __init__(self, config: ReuseConfig) -> None:
        super().__init__()
        self.config = config
        d_model, d = config.d_model, config.head_dim
        new_heads = config.n_heads - config.reuse_heads
        if new_heads:
            self.q_proj = nn.Linear(d_model, new_heads * d, bias=config.bias)
            self.k_proj = nn.Linear(d_model, new_heads * d, bias=config.bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=config.bias)
        self.o_proj = nn.Linear(d_model, d_model, bias=config.bias)

    def forward(
        self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None, prev_probs: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mask = check_input(x, key_padding_mask, self.config.d_model)
        n, reused = self.config.n_heads, self.config.reuse_heads
        fresh = n - reused
        batch, t = x.shape[:2]
        if reused:
            if prev_probs is None:
                raise VariantError(
                    f"reuse: this layer reuses {reused} heads and needs prev_probs, "
                    "the previous layer's probabilities [B,N,T,T]"
                )
            if (
                prev_probs.dim() != 4
                or prev_probs.shape[0] != batch
                or prev_probs.shape[1] < reused
                or prev_probs.shape[2:] != (t, t)
            ):
                raise VariantError(
                    f"reuse: prev_probs must be [{batch}, >={reused}, {t}, {t}], got {list(prev_probs.shape)}"
                )
        v = split_heads(self.v_proj(x), n)
        outs, probs = [], []
        if fresh:
            q, k = split_heads(self.q_proj(x), fresh), split_heads(self.k_proj(x), fresh)
            o_new, a_new = torch.ops.attn2onnx.prob_attention(q, k, v[:, :, :fresh], mask, 0.0, self.config.causal)
            outs.append(o_new)
            probs.append(a_new)
        if reused:
            r = prev_probs[:, :reused]
            outs.append(torch.matmul(r.to(v.dtype), v[:, :, fresh:].transpose(1, 2)).transpose(1, 2))
            probs.append(r)
        y = self.o_proj(torch.cat(outs, dim=2).flatten(-2))
        if not fresh and prev_probs.shape[1] == n:
            return y, prev_probs
        return y, torch.cat(probs, dim=1)

    def cache_entries(self) -> list[CacheEntry]:
        """What a decode step caches per layer: K of the fresh heads (none when every head is
        reused) and V of every head; reused heads take the new rows' probabilities from the
        previous layer within the step."""
        c = self.config
        fresh = c.n_heads - c.reuse_heads
        entries = (
            [
                CacheEntry(
                    "key",
                    ("batch", fresh, "past", c.head_dim),
                    "K of the fresh heads [batch, fresh heads, past, head_dim]",
                )
            ]
            if fresh
            else []
        )
        return entries + [
            CacheEntry(
                "value", ("batch", c.n_heads, "past", c.head_dim), "V, fresh heads first [batch, heads, past, head_dim]"
            )
        ]

    def decode_step(
        self,
        x: torch.Tensor,
        key_mask: torch.Tensor,
        positions: torch.Tensor,
        cache: tuple[torch.Tensor, ...],
        prev_probs: torch.Tensor | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]:
        """One causal decode step with explicit caches (:meth:`cache_entries`): x [B,T,D],
        key_mask [B,P+T] bool, positions (unused), prev_probs [B,N',T,P+T] of the new rows.
        Returns y, the caches extended, and the new rows' probabilities for the next layer."""
        n, reused = self.config.n_heads, self.config.reuse_heads
        fresh = n - reused
        v = extend_cache(cache[-1], split_heads(self.v_proj(x), n))
        outs, probs, present = [], [], []
        if fresh:
            q = split_heads(self.q_proj(x), fresh)
            k = extend_cache(cache[0], split_heads(self.k_proj(x), fresh))
            o_new, a_new = torch.ops.attn2onnx.prob_attention(q, k, v[:, :, :fresh], key_mask, 0.0, True)
            outs.append(o_new)
            probs.append(a_new)
            present.append(cache_layout(k))
        if reused:
            r = prev_probs[:, :reused]
            outs.append(torch.matmul(r.to(v.dtype), v[:, :, fresh:].transpose(1, 2)).transpose(1, 2))
            probs.append(r)
        y = self.o_proj(torch.cat(outs, dim=2).flatten(-2))
        return y, (*present, cache_layout(v)), torch.cat(probs, dim=1)


register_variant(
    VariantInfo(
        name="reuse",
        config_cls=ReuseConfig,
        module_cls=ReuseAttention,
        paper="Bhojanapalli et al., Leveraging Redundancy in Attention with Reuse Transformers (2021)",
        causal=True,
        params="2D^2 + 2D(N-P)d",
        families=("lm", "encoder", "layer"),
    )
)
