"""PooledNormAttention op: Attention-BN / SH / BN+SH, every backend side by side."""

from .._common import OpDef, register_op
from .onnx_function import RULES, SCHEMA, PooledNormAttention, translate_pooled_norm_attention
from .reference import pooled_norm_attention, pooled_norm_attention_reference

OP = register_op(
    OpDef(
        "PooledNormAttention",
        pooled_norm_attention,
        SCHEMA,
        translate_pooled_norm_attention,
        PooledNormAttention,
        RULES,
    )
)

__all__ = ["OP", "pooled_norm_attention", "pooled_norm_attention_reference"]
