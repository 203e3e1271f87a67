"""PooledNormAttention op: Attention-BN / SH / BN+SH, every backend side by side.

Importing the folder registers the op's schema (onnx only); its torch op and reference
(``pooled_norm_attention``, ``pooled_norm_attention_reference``, from reference.py) are imported
on first use (with torch).
"""

from .._common import OpDef, register_op, torch_attributes
from .onnx_function import RULES, SCHEMA, PooledNormAttention, translate_pooled_norm_attention

OP = register_op(
    OpDef(
        "PooledNormAttention",
        __name__,
        SCHEMA,
        translate_pooled_norm_attention,
        PooledNormAttention,
        RULES,
    )
)
__getattr__ = torch_attributes(OP)

__all__ = ["OP", "pooled_norm_attention", "pooled_norm_attention_reference"]
