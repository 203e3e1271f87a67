"""ProbAttention op: softmax attention that also returns its probabilities, every backend side by side."""

from .._common import OpDef, register_op
from .onnx_function import RULES, SCHEMA, ProbAttention, translate_prob_attention
from .reference import prob_attention, prob_attention_reference

OP = register_op(OpDef("ProbAttention", prob_attention, SCHEMA, translate_prob_attention, ProbAttention, RULES))

__all__ = ["OP", "prob_attention", "prob_attention_reference"]
