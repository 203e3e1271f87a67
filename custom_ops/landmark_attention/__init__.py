"""LandmarkAttention op: the iMHSA core, every backend side by side.

Importing the folder registers the op's schema (onnx only); its torch op and reference
(``landmark_attention``, ``landmark_attention_reference``, from reference.py) are imported on first use (with torch).
"""

from .._common import OpDef, register_op, torch_attributes
from .onnx_function import RULES, SCHEMA, LandmarkAttention, translate_landmark_attention

OP = register_op(OpDef("LandmarkAttention", __name__, SCHEMA, translate_landmark_attention, LandmarkAttention, RULES))
__getattr__ = torch_attributes(OP)

__all__ = ["OP", "landmark_attention", "landmark_attention_reference"]
