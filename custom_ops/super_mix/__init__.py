"""SuperMix op: super attention's token mixing, every backend side by side.

Importing the folder registers the op's schema (onnx only); its torch op and reference
(``super_mix``, ``super_mix_reference``, from reference.py) are imported on first use (with torch).
"""

from .._common import OpDef, register_op, torch_attributes
from .onnx_function import RULES, SCHEMA, SuperMix, translate_super_mix

OP = register_op(OpDef("SuperMix", __name__, SCHEMA, translate_super_mix, SuperMix, RULES))
__getattr__ = torch_attributes(OP)

__all__ = ["OP", "super_mix", "super_mix_reference"]
