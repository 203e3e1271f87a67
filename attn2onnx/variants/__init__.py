"""One PyTorch module per attention variant (variants.md), and the registry of them.

What ``attn2onnx variants`` lists about each variant and the module that registers it are in
:data:`LISTINGS`, readable without torch, so that ``attn2onnx variants`` answers without it and
``attn2onnx new`` refuses an unknown variant at once; the registry itself
(:mod:`attn2onnx.variants.base`, every variant module registered) is imported on first use of a
name below (PEP 562). A test holds the two equal.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any


@dataclass(frozen=True)
class Listing:
    """A variant as ``attn2onnx variants`` lists it: the fields of its registry entry
    (:class:`~attn2onnx.variants.base.VariantInfo`) that need no torch, and its module."""

    module: str  # the module under attn2onnx.variants that registers it
    paper: str
    causal: bool  # supports causal attention
    params: str  # parameter-count formula (biases excluded)
    families: tuple[str, ...]  # families it fits: lm, encoder, layer


_ALL_FAMILIES = ("lm", "encoder", "layer")
_NOT_CAUSAL = ("encoder", "layer")
_HOSSEINI = "Hosseini & Hosseini, You Need to Pay Better Attention (arXiv 2403.01643, 2024)"
_NGUYEN = "Nguyen et al., A Primal-Dual Framework for Transformers and Neural Networks (ICLR 2023)"

# Variant name -> its listing, in registration (variants.md) order.
LISTINGS: dict[str, Listing] = {
    "mha": Listing("mha", "Vaswani et al., Attention Is All You Need (NeurIPS 2017)", True, "4D^2", _ALL_FAMILIES),
    "optimised": Listing("hosseini", _HOSSEINI, True, "3D^2", _ALL_FAMILIES),
    "efficient": Listing("hosseini", _HOSSEINI, True, "2D^2", _ALL_FAMILIES),
    "super": Listing("hosseini", _HOSSEINI, True, "2D^2 + Lmax^2", _ALL_FAMILIES),
    "dcmha": Listing(
        "dcmha",
        "Xiao et al., DCFormer (ICML 2024)",
        True,
        "4D^2 + 4DK + 8KRN + 4DN (+2d QK-norm, +2N^2 static mix)",
        _ALL_FAMILIES,
    ),
    "imhsa": Listing(
        "imhsa",
        "Kang, Yang & Ryu, Interactive Multi-Head Self-Attention with Linear Complexity (2024)",
        False,
        "4D^2 + 2N^2 (mix pre or post), 4D^2 + 4N^2 (both)",
        _NOT_CAUSAL,
    ),
    "reuse": Listing(
        "reuse",
        "Bhojanapalli et al., Leveraging Redundancy in Attention with Reuse Transformers (2021)",
        True,
        "2D^2 + 2D(N-P)d",
        _ALL_FAMILIES,
    ),
    "bn": Listing("bn_sh", _NGUYEN, False, "4D^2", _NOT_CAUSAL),
    "sh": Listing("bn_sh", _NGUYEN, False, "4D^2", _NOT_CAUSAL),
    "bn-sh": Listing("bn_sh", _NGUYEN, False, "4D^2", _NOT_CAUSAL),
}
# Variant name -> module that registers it.
NAMES: dict[str, str] = {name: listing.module for name, listing in LISTINGS.items()}

__all__ = [
    "LISTINGS",
    "NAMES",
    "VARIANTS",
    "AttentionConfig",
    "Listing",
    "VariantError",
    "VariantInfo",
    "build_attention",
    "check_name",
    "get_variant",
    "make_config",
]

if TYPE_CHECKING:  # pragma: no cover  (for type checkers and IDEs)
    from .base import VARIANTS, AttentionConfig, VariantInfo, build_attention, get_variant, make_config


class VariantError(ValueError):
    """A variant was asked for something it cannot do (unknown name, unsupported option)."""


def check_name(name: str) -> None:
    """VariantError for a name that is no variant, without importing torch; the same words as
    :func:`attn2onnx.variants.base.get_variant`."""
    if name not in NAMES:
        raise VariantError(f"unknown variant {name!r}; known: {', '.join(NAMES)}")


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    base = importlib.import_module(".base", __name__)
    for module in dict.fromkeys(NAMES.values()):  # each registers its variants on import
        importlib.import_module(f".{module}", __name__)
    value = getattr(base, name)
    globals()[name] = value
    return value
