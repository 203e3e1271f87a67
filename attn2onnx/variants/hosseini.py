"""optimised, efficient and super attention (variants.md sections 2-4): Hosseini & Hosseini,
"You Need to Pay Better Attention" (arXiv 2403.01643).

Heads take contiguous column slices of the *raw* input, X_i = x[..., i d:(i+1) d]:

- optimised: no Wv. P_i = softmax((x Wq)_i (x Wk)_i^T / sqrt(d)); y = concat_i(P_i X_i) Wo.
- efficient: no Wv, no Wk. P_i = softmax((x Wq)_i X_i^T / sqrt(d)); y = concat_i(P_i X_i) Wo.
- super: efficient, with values mixed along tokens by one learned affine map over positions,
  weight WA [max_len, max_len] and bias b [max_len], shared by all heads:
  U = WA[:T,:T] x + b[:T] (b broadcast over channels; padded rows of x zeroed before the mix,
  padded rows of U re-zeroed after it; tril(WA) when causal), computed once per layer:
  ``WA[:T,:T] x`` by the ``ai.attn2onnx`` SuperMix op, the bias and the re-zeroing in standard
  ops after it; y = concat_i(P_i U_i) Wo.

Parameters: ``q_proj``, ``o_proj`` (and ``k_proj`` for optimised) nn.Linear; super adds ``wa``
[max_len, max_len], initialised to the identity, and ``wa_bias`` [max_len], initialised to zero
(a fresh super layer equals efficient).

WA's bias is on by default because the paper's parameter count (3168 at D = L = 32, N = 4) and
its public reference code both include it (a Keras ``Dense`` / ``nn.Linear(max_len, max_len)``
over positions); ``wa_bias=False`` drops it (U = WA x, 3136 parameters at that size).
Re-zeroing the padded rows of U changes no real token's output (a padded key is never attended
to); it keeps the bias out of a row whose tokens are all padding, which would otherwise average
b into its output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..custom_ops import torch_ops  # noqa: F401  (registers torch.ops.attn2onnx.super_mix)
from ..custom_ops._attention_math import attention
from .base import AttentionConfig, VariantError, VariantInfo, check_input, register_variant, split_heads
from .mha import CacheEntry, cache_layout, extend_cache

PAPER = "Hosseini & Hosseini, You Need to Pay Better Attention (arXiv 2403.01643, 2024)"


@dataclass
class OptimisedConfig(AttentionConfig):
    """Optimised attention has no options beyond :class:`AttentionConfig`."""


@dataclass
class EfficientConfig(AttentionConfig):
    """Efficient attention has no options beyond :class:`AttentionConfig`."""


@dataclass
class SuperConfig(EfficientConfig):
    """``max_len`` (from :class:`AttentionConfig`) fixes WA's size: longer inputs are an error.
    ``wa_bias`` gives the token mixing its learned per-position bias (on by default, see the
    module docstring); False keeps U = WA x."""

    wa_bias: bool = True


class _SlicedHeadAttention(nn.Module):
    """Shared body of the three variants: queries projected, keys projected (optimised) or raw
    slices of x, values from :meth:`values` (raw slices of x unless overridden)."""

    project_keys: ClassVar[bool]

    def __init__(self, config: AttentionConfig) -> None:
        super().__init__()
        self.config = config
        d_model = config.d_model
        self.q_proj = nn.Linear(d_model, d_model, bias=config.bias)
        if self.project_keys:
            self.k_proj = nn.Linear(d_model, d_model, bias=config.bias)
        self.o_proj = nn.Linear(d_model, d_model, bias=config.bias)

    def values(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Values [B,T,D] before the head split."""
        return x

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = check_input(x, key_padding_mask, self.config.d_model)
        n = self.config.n_heads
        q = split_heads(self.q_proj(x), n)
        k = split_heads(self.k_proj(x) if self.project_keys else x, n)
        v = split_heads(self.values(x, mask), n)
        o, _ = attention(q, k, v, mask, causal=self.config.causal)
        return self.o_proj(o.flatten(-2))

    def cache_entries(self) -> list[CacheEntry]:
        """What a decode step caches per layer: optimised K (projected) and V (x itself);
        efficient x itself, once, as both keys and values."""
        dims = ("batch", self.config.n_heads, "past", self.config.head_dim)
        if self.project_keys:
            return [
                CacheEntry("key", dims, "K = x Wk + bk [batch, heads, past, head_dim]"),
                CacheEntry("value", dims, "V = x in head slices [batch, heads, past, head_dim]"),
            ]
        return [CacheEntry("x", dims, "x in head slices, both keys and values [batch, heads, past, head_dim]")]

    def decode_step(
        self, x: torch.Tensor, key_mask: torch.Tensor, positions: torch.Tensor, cache: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """One causal decode step with explicit caches (:meth:`cache_entries`): x [B,T,D],
        key_mask [B,P+T] bool, positions [B,T] (unused here). Returns y and the caches extended."""
        n = self.config.n_heads
        q = split_heads(self.q_proj(x), n)
        if self.project_keys:
            k = extend_cache(cache[0], split_heads(self.k_proj(x), n))
            v = extend_cache(cache[1], split_heads(x, n))
            present = (k, v)
        else:
            k = v = extend_cache(cache[0], split_heads(x, n))
            present = (k,)
        o, _ = attention(q, k, v, key_mask, causal=True)
        return self.o_proj(o.flatten(-2)), tuple(cache_layout(t) for t in present)


class OptimisedAttention(_SlicedHeadAttention):
    """forward(x [B,T,D], key_padding_mask [B,T] bool | None = None) -> y [B,T,D]. No Wv."""

    project_keys = True


class EfficientAttention(_SlicedHeadAttention):
    """forward(x [B,T,D], key_padding_mask [B,T] bool | None = None) -> y [B,T,D]. No Wk, no Wv."""

    project_keys = False


class SuperAttention(EfficientAttention):
    """forward(x [B,T,D], key_padding_mask [B,T] bool | None = None) -> y [B,T,D], T <= max_len."""

    def __init__(self, config: SuperConfig) -> None:
        super().__init__(config)
        self.wa = nn.Parameter(torch.eye(config.max_len))
        if config.wa_bias:
            self.wa_bias = nn.Parameter(torch.zeros(config.max_len))

    def values(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        if t > self.config.max_len:
            raise VariantError(f"super attention: sequence length {t} exceeds max_len {self.config.max_len}")
        u = torch.ops.attn2onnx.super_mix(x, self.wa, mask, self.config.causal)
        if self.config.wa_bias:
            u = u + self.wa_bias[:t, None]
        return u * mask.unsqueeze(-1).to(u.dtype)  # padded rows of U re-zeroed

    def cache_entries(self) -> list[CacheEntry]:
        """What a decode step caches per layer: the past x (keys, and what new rows of U mix)
        and the past rows of U (values), which later tokens never change (tril(WA))."""
        dims = ("batch", self.config.n_heads, "past", self.config.head_dim)
        return [
            CacheEntry("key", dims, "x in head slices (keys; mixed into new U rows) [batch, heads, past, d]"),
            CacheEntry("value", dims, "U = tril(WA) x + b rows in head slices [batch, heads, past, head_dim]"),
        ]

    def decode_step(
        self, x: torch.Tensor, key_mask: torch.Tensor, positions: torch.Tensor, cache: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """One causal decode step: the new rows of U = tril(WA) x + b at ``positions`` [B,T]
        (rows of WA; its columns are the cache's positions 0..P+T-1) from the cached and new x,
        O(P+T) per token. x [B,T,D], key_mask [B,P+T] bool, cache (x, U) [B,N,P,d]."""
        n, t = self.config.n_heads, x.shape[1]
        if not self.config.causal:
            raise VariantError("super attention: decoding needs causal=True")
        q = split_heads(self.q_proj(x), n)
        keys = extend_cache(cache[0], split_heads(x, n))  # [B,S,N,d]
        s = keys.shape[1]
        real = key_mask.unsqueeze(-1).to(x.dtype)
        mix = self.wa[positions][..., :s]  # [B,T,S]
        mix = mix * (torch.arange(s, device=x.device) <= positions[..., None]).to(mix.dtype)  # tril(WA)
        u = torch.matmul(mix.to(x.dtype), keys.flatten(-2) * real)
        if self.config.wa_bias:
            u = u + self.wa_bias[positions][..., None]
        values = extend_cache(cache[1], split_heads(u * real[:, s - t :], n))
        o, _ = attention(q, keys, values, key_mask, causal=True)
        return self.o_proj(o.flatten(-2)), (cache_layout(keys), cache_layout(values))


for _name, _config, _module, _params in (
    ("optimised", OptimisedConfig, OptimisedAttention, "3D^2"),
    ("efficient", EfficientConfig, EfficientAttention, "2D^2"),
    ("super", SuperConfig, SuperAttention, "2D^2 + Lmax^2"),
):
    register_variant(
        VariantInfo(
            name=_name,
            config_cls=_config,
            module_cls=_module,
            paper=PAPER,
            causal=True,
            params=_params,
            families=("lm", "encoder", "layer"),
        )
    )
