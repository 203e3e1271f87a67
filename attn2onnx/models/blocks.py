"""The transformer block every family shares: pre-norm, attention from the variant registry,
MLP (SwiGLU or GELU), residuals. Blocks of a probability-passing variant (reuse) take the
previous layer's probabilities and hand theirs on.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import UsageError
from ..variants import build_attention
from .config import ModelConfig

NORM_EPS = 1e-6


def make_norm(kind: str, dim: int, eps: float = NORM_EPS) -> nn.Module:
    """``rms`` (the LM's) or ``layer`` (the encoder's) normalisation over the last axis."""
    if kind == "rms":
        return nn.RMSNorm(dim, eps=eps)
    return nn.LayerNorm(dim, eps=eps)


class MLP(nn.Module):
    """``gelu``: fc2(gelu(fc1 x)) with biases; ``swiglu``: down(silu(gate x) * up x), no biases."""

    def __init__(self, kind: str, d_model: int, hidden: int) -> None:
        super().__init__()
        self.kind = kind
        if kind == "swiglu":
            self.gate = nn.Linear(d_model, hidden, bias=False)
            self.up = nn.Linear(d_model, hidden, bias=False)
            self.down = nn.Linear(hidden, d_model, bias=False)
        else:
            self.fc1 = nn.Linear(d_model, hidden)
            self.fc2 = nn.Linear(hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """x + attn(norm1 x), then x + mlp(norm2 x). ``forward`` returns (x, probs); probs is the
    attention's probabilities for a variant with ``passes_probs`` and None otherwise."""

    def __init__(self, attn: nn.Module, config: ModelConfig, norm: str) -> None:
        super().__init__()
        self.passes_probs = bool(getattr(attn, "passes_probs", False))
        self.norm1 = make_norm(norm, config.d_model, config.norm_eps)
        self.attn = attn
        self.norm2 = make_norm(norm, config.d_model, config.norm_eps)
        self.mlp = MLP(config.mlp, config.d_model, config.mlp_hidden)

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        probs: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.norm1(x)
        if self.passes_probs:
            a, probs = self.attn(h, key_padding_mask, prev_probs=probs)
        else:
            a = self.attn(h, key_padding_mask)
        x = x + a
        return x + self.mlp(self.norm2(x)), probs


def build_attentions(config: ModelConfig) -> list[nn.Module]:
    """One attention module per layer, from the registry."""
    return [build_attention(config.variant, cfg) for cfg in config.attention_configs()]


class Trunk(nn.Module):
    """The block stack: threads probabilities between blocks of a reuse model."""

    def __init__(self, config: ModelConfig, norm: str) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(attn, config, norm) for attn in build_attentions(config))

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        probs = None
        for block in self.blocks:
            x, probs = block(x, key_padding_mask, probs)
        return x


def check_seq_len(length: int | torch.SymInt, max_len: int, what: str) -> None:
    """A clear error for a sequence longer than ``max_len``. Under torch.export the sequence
    dimension must be declared with ``max`` <= max_len (e.g. Dim("seq", max=max_len))."""
    if length > max_len:
        raise UsageError(f"{what} has {length} tokens, more than the model's max_len {max_len}")


def check_padding_mask(mask: torch.Tensor | None, shape: tuple, what: str) -> torch.Tensor | None:
    """key_padding_mask must be [B,T] like the token ids; returned as bool."""
    if mask is None:
        return None
    if mask.dim() != 2 or mask.shape[0] != shape[0] or mask.shape[1] != shape[1]:
        raise UsageError(f"key_padding_mask must be [batch, seq] = {list(shape)} like {what}, got {list(mask.shape)}")
    return mask.to(torch.bool)


def check_token_ids(ids: torch.Tensor, what: str) -> None:
    if ids.dim() != 2:
        raise UsageError(f"{what} takes token ids [batch, seq], got a tensor of shape {list(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise UsageError(f"{what} takes integer token ids, got {ids.dtype}")


def init_normal_(param: torch.Tensor, std: float = 0.02) -> torch.Tensor:
    with torch.no_grad():
        return param.normal_(0.0, std)


__all__ = [
    "Block",
    "MLP",
    "Trunk",
    "build_attentions",
    "check_padding_mask",
    "check_seq_len",
    "check_token_ids",
    "make_norm",
]
