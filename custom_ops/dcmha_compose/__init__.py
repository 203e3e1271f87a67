"""DcmhaCompose op: one DCMHA compose step, every backend side by side."""

from .._common import OpDef, register_op
from .onnx_function import RULES, SCHEMA, DcmhaCompose, translate_dcmha_compose
from .reference import dcmha_compose, dcmha_compose_reference

OP = register_op(OpDef("DcmhaCompose", dcmha_compose, SCHEMA, translate_dcmha_compose, DcmhaCompose, RULES))

__all__ = ["OP", "dcmha_compose", "dcmha_compose_reference"]
