"""imhsa: interactive multi-head self-attention with linear complexity (variants.md section 6;
Kang, Yang & Ryu, 2024).

q, k, v as in mha. Queries and keys are average-pooled to L landmarks (masked means over
contiguous segments of the real tokens, or an s x s grid of a square token map); each head
attends through two thin maps, S_Q = q k~^T / sqrt(d) [T,L] and S_K = q~ k^T / sqrt(d) [L,S],
and the heads interact through dense N x N maps plus biases on those small maps. The whole core
is the ``ai.attn2onnx`` LandmarkAttention op; see its reference for the exact definition.

Options: ``landmarks`` L (default 16); ``grid`` s > 0 pools an s x s grid (then L must be
s*s and T a perfect square); ``mix`` = "pre" (default: mix the logits), "post" (mix the
probabilities) or "both".

Parameters: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` nn.Linear, and for each active mix
stage ``<stage>_mix_q``, ``<stage>_mix_k`` [N,N] (init identity) and ``<stage>_bias_q``,
``<stage>_bias_k`` [N] (init zero), stage in {pre, post}. A stage that is off passes identity /
zero buffers to the op (mixing by I with bias 0 is exact). Not causal: every landmark sees the
whole sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..custom_ops import torch_ops  # noqa: F401  (registers torch.ops.attn2onnx.landmark_attention)
from .base import AttentionConfig, VariantError, VariantInfo, check_input, register_variant, split_heads

MIX_MODES = {"pre": ("pre",), "post": ("post",), "both": ("pre", "post")}


@dataclass
class ImhsaConfig(AttentionConfig):
    """iMHSA options (see the module docstring)."""

    landmarks: int = 16
    grid: int = 0
    mix: str = "pre"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mix not in MIX_MODES:
            raise VariantError(f"imhsa: mix must be one of {', '.join(MIX_MODES)}, got {self.mix!r}")
        if self.landmarks < 1 or self.grid < 0:
            raise VariantError(f"imhsa: landmarks must be >= 1 and grid >= 0, got {self.landmarks} and {self.grid}")
        if self.grid and self.landmarks != self.grid * self.grid:
            raise VariantError(
                f"imhsa: grid {self.grid} pools to {self.grid**2} landmarks; set landmarks={self.grid**2}"
            )


class InteractiveMHSA(nn.Module):
    """forward(x [B,T,D], key_padding_mask [B,T] bool | None = None) -> y [B,T,D]."""

    def __init__(self, config: ImhsaConfig) -> None:
        super().__init__()
        if config.causal:
            raise VariantError("imhsa cannot be causal: every landmark sees the whole sequence")
        self.config = config
        d_model, n = config.d_model, config.n_heads
        self.q_proj = nn.Linear(d_model, d_model, bias=config.bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=config.bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=config.bias)
        self.o_proj = nn.Linear(d_model, d_model, bias=config.bias)
        for stage in MIX_MODES[config.mix]:
            for side in ("q", "k"):
                setattr(self, f"{stage}_mix_{side}", nn.Parameter(torch.eye(n)))
                setattr(self, f"{stage}_bias_{side}", nn.Parameter(torch.zeros(n)))
        self.register_buffer("identity_mix", torch.eye(n), persistent=False)
        self.register_buffer("zero_bias", torch.zeros(n), persistent=False)

    def _mixing(self) -> list[torch.Tensor]:
        """The op's eight mixing inputs: pre q, pre k, post q, post k as (mix, bias) pairs."""
        active = MIX_MODES[self.config.mix]
        out = []
        for stage in ("pre", "post"):
            for side in ("q", "k"):
                if stage in active:
                    out += [getattr(self, f"{stage}_mix_{side}"), getattr(self, f"{stage}_bias_{side}")]
                else:
                    out += [self.identity_mix, self.zero_bias]
        return out

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = check_input(x, key_padding_mask, self.config.d_model)
        n = self.config.n_heads
        q, k, v = (split_heads(proj(x), n) for proj in (self.q_proj, self.k_proj, self.v_proj))
        o = torch.ops.attn2onnx.landmark_attention(
            q, k, v, mask, *self._mixing(), self.config.landmarks, self.config.grid, 0.0
        )
        return self.o_proj(o.flatten(-2))


register_variant(
    VariantInfo(
        name="imhsa",
        config_cls=ImhsaConfig,
        module_cls=InteractiveMHSA,
        paper="Kang, Yang & Ryu, Interactive Multi-Head Self-Attention with Linear Complexity (2024)",
        causal=False,
        params="4D^2 + 2N^2 (mix pre or post), 4D^2 + 4N^2 (both)",
        families=("encoder", "layer"),
    )
)
