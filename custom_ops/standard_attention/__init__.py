"""StandardAttention op: plain masked softmax attention on [B,T,D] tensors (variants.md section 1),
with its masks as modes (causal, local window) and a [B,S] key padding mask, every backend side
by side.

Importing the folder registers the op's schema (onnx only); its torch op and reference
(``standard_attention``, ``standard_attention_reference``, from reference.py) are imported on
first use (with torch).
"""

from .._common import Backends, OpDef, register_op, torch_attributes
from .onnx_function import RULES, SCHEMA, StandardAttention, translate_standard_attention

# backends.py declares the C++ kernel (the flash form of the DcmhaAttention kernel's core).
OP = register_op(
    OpDef(
        "StandardAttention",
        __name__,
        SCHEMA,
        translate_standard_attention,
        StandardAttention,
        RULES,
        backends=Backends.declared(__name__),
    )
)
__getattr__ = torch_attributes(OP)

__all__ = ["OP", "standard_attention", "standard_attention_reference"]
