"""DcmhaAttention op: the whole DCMHA attention core, every backend side by side.

Its function body calls DcmhaCompose, so importing this op registers that one too. Importing the
folder registers the op's schema (onnx only); its torch op and reference (``dcmha_attention``,
``dcmha_attention_reference``, from reference.py) are imported on first use (with torch).
"""

from .._common import Backends, OpDef, register_op, torch_attributes
from .. import dcmha_compose  # noqa: F401  (the body calls ai.attn2onnx::DcmhaCompose)
from .onnx_function import OVERLOADS, RULES, SCHEMA, DcmhaAttention, translate_dcmha_attention

# backends.py declares the C++ kernel, the Triton kernel (imported by OP.load_torch where triton
# is) and the TensorRT plugin.
OP = register_op(
    OpDef(
        "DcmhaAttention",
        __name__,
        SCHEMA,
        translate_dcmha_attention,
        DcmhaAttention,
        RULES,
        backends=Backends.declared(__name__),
        overloads=OVERLOADS,
    )
)
__getattr__ = torch_attributes(OP)

__all__ = ["OP", "dcmha_attention", "dcmha_attention_reference"]
