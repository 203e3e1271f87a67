"""CacheUpdate op: write a decode step's new cache rows into a max-length buffer.

Importing the folder registers the op's schema (onnx only); its torch op and reference
(``cache_update``, ``cache_update_reference``, from reference.py) are imported on first use (with torch).
"""

from .._common import Backends, OpDef, register_op, torch_attributes
from .onnx_function import RULES, SCHEMA, CacheUpdate, translate_cache_update

# backends.py declares the C++ kernel (the in-place write of shared KV buffers).
OP = register_op(
    OpDef(
        "CacheUpdate",
        __name__,
        SCHEMA,
        translate_cache_update,
        CacheUpdate,
        RULES,
        backends=Backends.declared(__name__),
    )
)
__getattr__ = torch_attributes(OP)

__all__ = ["OP", "cache_update", "cache_update_reference"]
