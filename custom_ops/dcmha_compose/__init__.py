"""DcmhaCompose op: one DCMHA compose step, every backend side by side.

Importing the folder registers the op's schema (onnx only); its torch op and reference
(``dcmha_compose``, ``dcmha_compose_reference``, from reference.py) are imported on first use (with torch).
"""

from .._common import OpDef, register_op, torch_attributes
from .onnx_function import RULES, SCHEMA, DcmhaCompose, translate_dcmha_compose

OP = register_op(OpDef("DcmhaCompose", __name__, SCHEMA, translate_dcmha_compose, DcmhaCompose, RULES))
__getattr__ = torch_attributes(OP)

__all__ = ["OP", "dcmha_compose", "dcmha_compose_reference"]
