"""bn, sh, bn-sh: Attention-BN, Attention-SH and both (variants.md sections 8-10; Nguyen et al.,
"A Primal-Dual Framework for Transformers and Neural Networks", ICLR 2023).

q, k, v as in mha, then the ``ai.attn2onnx`` PooledNormAttention op:

- sh: head h average-pools its keys and values along tokens by ``sh_factors[h]`` (kernel =
  stride, last window partial, masked mean over real tokens); queries are not pooled, so the
  output keeps T tokens. Default factors: the first ceil(N/2) heads 1, the rest 2.
- bn: per (batch, head, channel) statistics of the keys over the real key tokens, mu and the
  population variance; q^ = (q - beta mu) / sqrt(var + eps), k^ likewise (``rescale=False``:
  centre only). No running statistics: train and eval compute the same function.
- bn-sh: pool first, then normalise with the statistics of that head's pooled keys.

Parameters: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` nn.Linear. Not causal as defined.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..custom_ops import torch_ops  # noqa: F401  (registers torch.ops.attn2onnx.pooled_norm_attention)
from .base import AttentionConfig, VariantError, VariantInfo, check_input, register_variant, split_heads

PAPER = "Nguyen et al., A Primal-Dual Framework for Transformers and Neural Networks (ICLR 2023)"


@dataclass
class BnConfig(AttentionConfig):
    """Attention-BN: ``eps`` inside the root, ``beta`` weight of the subtracted mean,
    ``rescale`` (False: centre only)."""

    eps: float = 1e-5
    beta: float = 1.0
    rescale: bool = True


@dataclass
class ShConfig(AttentionConfig):
    """Attention-SH: ``sh_factors``, one pooling factor >= 1 per head (None: the first ceil(N/2)
    heads 1, the rest 2)."""

    sh_factors: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        n = self.n_heads
        if self.sh_factors is None:
            first = -(-n // 2)
            self.sh_factors = (1,) * first + (2,) * (n - first)
        self.sh_factors = tuple(int(f) for f in self.sh_factors)
        if len(self.sh_factors) != n or min(self.sh_factors) < 1:
            raise VariantError(f"sh_factors must be {n} integers >= 1 (one per head), got {list(self.sh_factors)}")


@dataclass
class BnShConfig(BnConfig, ShConfig):
    """Attention-BN+SH: the options of both."""


class PooledNormAttentionModule(nn.Module):
    """forward(x [B,T,D], key_padding_mask [B,T] bool | None = None) -> y [B,T,D].

    One module for the three variants: the config's type says what it does (BN statistics for
    a :class:`BnConfig`, pooling factors for a :class:`ShConfig`)."""

    def __init__(self, config: AttentionConfig) -> None:
        super().__init__()
        if config.causal:
            raise VariantError(
                "bn / sh / bn-sh cannot be causal: the key statistics and pooled "
                "windows are taken over the whole sequence"
            )
        self.config = config
        d_model = config.d_model
        self.q_proj = nn.Linear(d_model, d_model, bias=config.bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=config.bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=config.bias)
        self.o_proj = nn.Linear(d_model, d_model, bias=config.bias)
        self.normalize = isinstance(config, BnConfig)
        self.factors = list(config.sh_factors) if isinstance(config, ShConfig) else [1] * config.n_heads

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = check_input(x, key_padding_mask, self.config.d_model)
        n = self.config.n_heads
        q, k, v = (split_heads(proj(x), n) for proj in (self.q_proj, self.k_proj, self.v_proj))
        eps, beta, rescale = (
            (self.config.eps, self.config.beta, self.config.rescale) if self.normalize else (1e-5, 1.0, True)
        )
        o = torch.ops.attn2onnx.pooled_norm_attention(
            q, k, v, mask, self.factors, self.normalize, eps, beta, rescale, 0.0
        )
        return self.o_proj(o.flatten(-2))


for _name, _config in (("bn", BnConfig), ("sh", ShConfig), ("bn-sh", BnShConfig)):
    register_variant(
        VariantInfo(
            name=_name,
            config_cls=_config,
            module_cls=PooledNormAttentionModule,
            paper=PAPER,
            causal=False,
            params="4D^2",
            families=("encoder", "layer"),
        )
    )
