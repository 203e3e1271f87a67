"""ProbAttention op: softmax attention that also returns its probabilities, every backend side by side.

Importing the folder registers the op's schema (onnx only); its torch op and reference
(``prob_attention``, ``prob_attention_reference``, from reference.py) are imported on first use (with torch).
"""

from .._common import OpDef, register_op, torch_attributes
from .onnx_function import RULES, SCHEMA, ProbAttention, translate_prob_attention

OP = register_op(OpDef("ProbAttention", __name__, SCHEMA, translate_prob_attention, ProbAttention, RULES))
__getattr__ = torch_attributes(OP)

__all__ = ["OP", "prob_attention", "prob_attention_reference"]
