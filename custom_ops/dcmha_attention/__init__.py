"""DcmhaAttention op: the whole DCMHA attention core, every backend side by side.

Its function body calls DcmhaCompose, so importing this op registers that one too.
"""
import importlib.util

from .._common import OpDef, register_autograd_from_reference, register_op
from .. import dcmha_compose  # noqa: F401  (the body calls ai.attn2onnx::DcmhaCompose)
from .onnx_function import RULES, SCHEMA, DcmhaAttention, translate_dcmha_attention
from .reference import dcmha_attention, dcmha_attention_reference

register_autograd_from_reference(dcmha_attention, dcmha_attention_reference)
OP = register_op(OpDef("DcmhaAttention", dcmha_attention, SCHEMA, translate_dcmha_attention, DcmhaAttention, RULES))

if importlib.util.find_spec("triton") is not None:
    from . import triton_kernel  # noqa: F401  (CUDA tensors dispatch to the fused Triton kernel)

__all__ = ["OP", "dcmha_attention", "dcmha_attention_reference"]
