"""DcmhaAttention op: the whole DCMHA attention core, every backend side by side.

Its function body calls DcmhaCompose, so importing this op registers that one too.
"""

from .._common import Backends, OpDef, register_op
from .. import dcmha_compose  # noqa: F401  (the body calls ai.attn2onnx::DcmhaCompose)
from .onnx_function import OVERLOADS, RULES, SCHEMA, DcmhaAttention, translate_dcmha_attention
from .reference import dcmha_attention, dcmha_attention_reference

# backends.py declares the C++ kernel, the Triton kernel (imported by register_op where triton is)
# and the TensorRT plugin.
OP = register_op(
    OpDef(
        "DcmhaAttention",
        dcmha_attention,
        SCHEMA,
        translate_dcmha_attention,
        DcmhaAttention,
        RULES,
        backends=Backends.declared(__name__),
        overloads=OVERLOADS,
    )
)

__all__ = ["OP", "dcmha_attention", "dcmha_attention_reference"]
