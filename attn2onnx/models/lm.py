"""CausalLM: decoder-only language model around any causal attention variant."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .blocks import Trunk, check_padding_mask, check_seq_len, check_token_ids, init_normal_, make_norm
from .config import ModelConfig


class CausalLM(nn.Module):
    """Token embedding + learned absolute positions (none when the variant applies RoPE
    itself), ``layers`` pre-RMSNorm blocks of causal attention, final RMSNorm, and a head
    tied to the embedding (or its own, ``tie_embeddings=False``).

    forward(input_ids [B,T] int, key_padding_mask [B,T] bool | None) -> logits [B,T,V].
    A variant that cannot be causal (imhsa, bn, sh, bn-sh) is rejected by ModelConfig.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.family != "lm":
            raise ValueError(f"CausalLM needs family 'lm', got {config.family!r}")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        init_normal_(self.embed.weight)
        self.pos = None if config.uses_rope else nn.Parameter(init_normal_(torch.empty(config.max_len, config.d_model)))
        self.trunk = Trunk(config, norm="rms")
        self.norm = make_norm("rms", config.d_model, config.norm_eps)
        self.head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        check_token_ids(input_ids, "CausalLM")
        mask = check_padding_mask(key_padding_mask, input_ids.shape, "input_ids")
        length = input_ids.shape[1]
        check_seq_len(length, self.config.max_len, "input_ids")
        x = self.embed(input_ids)
        if self.pos is not None:
            x = x + self.pos[:length]
        x = self.norm(self.trunk(x, mask))
        return F.linear(x, self.embed.weight) if self.head is None else self.head(x)
