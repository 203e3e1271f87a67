"""AttentionLayer: one bare attention layer of any variant (no norm, MLP or residual)."""

from __future__ import annotations

import torch
from torch import nn

from .blocks import build_attentions
from .config import ModelConfig


class AttentionLayer(nn.Module):
    """forward(x [B,T,D], key_padding_mask [B,T] bool | None) -> y [B,T,D].

    The ``causal`` variant option picks causal attention where the variant supports it. A
    probability-passing variant (reuse) runs as its first layer (no reused heads) and only y is
    returned.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.family != "layer":
            raise ValueError(f"AttentionLayer needs family 'layer', got {config.family!r}")
        self.config = config
        (self.attn,) = build_attentions(config)
        self.passes_probs = bool(getattr(self.attn, "passes_probs", False))

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.passes_probs:
            y, _ = self.attn(x, key_padding_mask, prev_probs=None)
            return y
        return self.attn(x, key_padding_mask)
