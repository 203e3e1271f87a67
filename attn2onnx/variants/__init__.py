"""One PyTorch module per attention variant (variants.md), and the registry of them.

Importing this package registers every variant; see :mod:`attn2onnx.variants.base`.
"""

from .base import (
    VARIANTS,
    AttentionConfig,
    VariantError,
    VariantInfo,
    build_attention,
    get_variant,
    make_config,
)

# Variant modules register themselves on import (one line each, in variants.md order).
from . import mha  # noqa: F401,E402
from . import hosseini  # noqa: F401,E402
from . import dcmha  # noqa: F401,E402
from . import imhsa  # noqa: F401,E402
from . import reuse  # noqa: F401,E402
from . import bn_sh  # noqa: F401,E402

__all__ = [
    "VARIANTS",
    "AttentionConfig",
    "VariantError",
    "VariantInfo",
    "build_attention",
    "get_variant",
    "make_config",
]
