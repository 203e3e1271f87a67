"""What every attention variant shares: its config base class, the module interface and the
registry that maps a variant's name to its config and module.

Module interface (every variant):
    ``forward(x [B,T,D], key_padding_mask [B,T] bool | None = None) -> y [B,T,D]``
Variants with ``passes_probs = True`` (reuse) instead take and return probabilities:
    ``forward(x, key_padding_mask=None, prev_probs [B,N,T,T] | None = None) -> (y, probs)``
The model families thread ``probs`` from layer to layer.

Parameter names (the float64 oracles in tests/ read weights by these names):
    ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``: nn.Linear (y = x W^T + b, W is [out, in]).
Variant-specific parameters are documented on each module.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from . import VariantError  # defined torch-free, for `attn2onnx new`'s early name check


@dataclass
class AttentionConfig:
    """Options every variant has. ``d_model`` must be divisible by ``n_heads``."""

    d_model: int = 64
    n_heads: int = 4
    causal: bool = False
    bias: bool = True
    max_len: int = 256

    def __post_init__(self) -> None:
        if self.d_model <= 0 or self.n_heads <= 0:
            raise VariantError(f"d_model and n_heads must be positive, got {self.d_model} and {self.n_heads}")
        if self.d_model % self.n_heads:
            raise VariantError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class VariantInfo:
    """One row of the registry (and of ``attn2onnx variants``)."""

    name: str
    config_cls: type[AttentionConfig]
    module_cls: type[nn.Module]
    paper: str
    causal: bool  # supports causal attention
    params: str  # parameter-count formula (biases excluded), for the table
    families: tuple[str, ...]  # families it fits: lm, encoder, layer


VARIANTS: dict[str, VariantInfo] = {}


def register_variant(info: VariantInfo) -> VariantInfo:
    VARIANTS[info.name] = info
    return info


def get_variant(name: str) -> VariantInfo:
    """Registry lookup with a one-line error naming the known variants."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise VariantError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}") from None


def make_config(name: str, **options) -> AttentionConfig:
    """Config of variant ``name`` from keyword options; unknown options are a clear error."""
    cls = get_variant(name).config_cls
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise VariantError(f"variant {name!r} has no option(s) {', '.join(unknown)}")
    return cls(**options)


def build_attention(name: str, config: AttentionConfig | None = None, **options) -> nn.Module:
    """Instantiate variant ``name`` from a config or keyword options."""
    info = get_variant(name)
    config = config if config is not None else make_config(name, **options)
    if config.causal and not info.causal:
        raise VariantError(f"variant {name!r} cannot be causal")
    return info.module_cls(config)


def check_input(x: torch.Tensor, key_padding_mask: torch.Tensor | None, d_model: int) -> torch.Tensor:
    """Validate x [B,T,D] and the mask; return a bool mask [B,T] (all true when none given)."""
    if x.dim() != 3 or x.shape[-1] != d_model:
        raise VariantError(f"expected input [batch, seq, {d_model}], got {list(x.shape)}")
    if key_padding_mask is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    if key_padding_mask.shape != x.shape[:2]:
        raise VariantError(
            f"key_padding_mask must be [batch, seq] = {list(x.shape[:2])}, got {list(key_padding_mask.shape)}"
        )
    return key_padding_mask.to(torch.bool)


def split_heads(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[B,T,N*d] -> [B,T,N,d] (contiguous column blocks per head)."""
    return t.unflatten(-1, (n_heads, -1))
