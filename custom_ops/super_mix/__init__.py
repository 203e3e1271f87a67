"""SuperMix op: super attention's token mixing, every backend side by side."""

from .._common import OpDef, register_op
from .onnx_function import RULES, SCHEMA, SuperMix, translate_super_mix
from .reference import super_mix, super_mix_reference

OP = register_op(OpDef("SuperMix", super_mix, SCHEMA, translate_super_mix, SuperMix, RULES))

__all__ = ["OP", "super_mix", "super_mix_reference"]
