"""LandmarkAttention op: the iMHSA core, every backend side by side."""

from .._common import OpDef, register_op
from .onnx_function import RULES, SCHEMA, LandmarkAttention, translate_landmark_attention
from .reference import landmark_attention, landmark_attention_reference

OP = register_op(
    OpDef("LandmarkAttention", landmark_attention, SCHEMA, translate_landmark_attention, LandmarkAttention, RULES)
)

__all__ = ["OP", "landmark_attention", "landmark_attention_reference"]
