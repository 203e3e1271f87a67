"""One PyTorch module per attention variant (variants.md), and the registry of them.

The registry's names are in :data:`NAMES`, readable without torch, so that ``attn2onnx new``
refuses an unknown variant at once; the registry itself (:mod:`attn2onnx.variants.base`, every
variant module registered) is imported on first use of a name below (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Variant name -> module that registers it, in registration (variants.md) order; a test holds
# it equal to the registry.
NAMES: dict[str, str] = {
    "mha": "mha",
    "optimised": "hosseini",
    "efficient": "hosseini",
    "super": "hosseini",
    "dcmha": "dcmha",
    "imhsa": "imhsa",
    "reuse": "reuse",
    "bn": "bn_sh",
    "sh": "bn_sh",
    "bn-sh": "bn_sh",
}

__all__ = [
    "NAMES",
    "VARIANTS",
    "AttentionConfig",
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
