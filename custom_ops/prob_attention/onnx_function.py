"""ONNX side of ProbAttention: schema, standard-op function body and export translation."""

from __future__ import annotations

from onnx.defs import OpSchema
from onnxscript import BOOL, FLOAT, script
from onnxscript import opset23 as op
from onnxscript.values import Opset

from .._common import DOMAIN, FLAG, NEG, OPSET_VERSION, AttrRule, OpRules, make_schema

a2o = Opset(DOMAIN, OPSET_VERSION)

RULES = OpRules(
    attributes=(AttrRule("scale"), AttrRule("causal", choices=FLAG)),
    inputs={"q": "B T N d", "k": "B S N d", "v": "B S N d", "key_padding_mask": "B S"},
)

SCHEMA = make_schema(
    "ProbAttention",
    "Masked softmax attention returning o [B,T,N,d] and the post-softmax probabilities [B,N,T,S].",
    inputs=[("q", "T", ""), ("k", "T", ""), ("v", "T", ""), ("key_padding_mask", "tensor(bool)", "")],
    outputs=[("o", "T"), ("probs", "T")],
    attributes=[
        ("scale", OpSchema.AttrType.FLOAT, "logit scale, 0 = 1/sqrt(d)"),
        ("causal", OpSchema.AttrType.INT, "1: query t sees key s iff s <= t + S - T"),
    ],
    required=RULES.required,
)


@script(a2o, default_opset=op)
def ProbAttention(q, k, v, key_padding_mask, scale: float = 0.0, causal: int = 0):
    """Standard-op body: scaled logits, where(allowed, ., NEG), fp32 Softmax, probs @ v."""
    qh = op.Transpose(q, perm=[0, 2, 1, 3])
    kt = op.Transpose(k, perm=[0, 2, 3, 1])
    vh = op.Transpose(v, perm=[0, 2, 1, 3])
    scale_attr = op.Constant(value_float=scale)
    head_dim = op.Cast(op.Shape(q, start=3, end=4), to=1)
    default_scale = op.Reciprocal(op.Sqrt(head_dim))
    scale_val = op.Where(op.Equal(scale_attr, op.Constant(value_float=0.0)), default_scale, scale_attr)
    logits = op.Cast(op.Mul(op.MatMul(qh, kt), op.CastLike(scale_val, q)), to=1)
    # allowed [B,1,T,S]: real keys, and s <= t + S - T when causal
    t = op.Squeeze(op.Shape(q, start=1, end=2))
    s = op.Squeeze(op.Shape(k, start=1, end=2))
    zero = op.Constant(value_int=0)
    one = op.Constant(value_int=1)
    queries = op.Unsqueeze(op.Add(op.Range(zero, t, one), op.Sub(s, t)), op.Constant(value_ints=[1]))
    keys = op.Unsqueeze(op.Range(zero, s, one), op.Constant(value_ints=[0]))
    not_causal = op.Not(op.Cast(op.Constant(value_int=causal), to=9))
    visible = op.Or(op.LessOrEqual(keys, queries), not_causal)
    allowed = op.And(op.Unsqueeze(key_padding_mask, op.Constant(value_ints=[1, 2])), visible)
    probs = op.Softmax(op.Where(allowed, logits, op.Constant(value_float=NEG)), axis=-1)
    probs = op.CastLike(probs, q)
    o = op.Transpose(op.MatMul(probs, vh), perm=[0, 2, 1, 3])
    return o, probs


@script(a2o)
def translate_prob_attention(
    q: FLOAT, k: FLOAT, v: FLOAT, key_padding_mask: BOOL, scale: float, causal: bool
) -> tuple[FLOAT, FLOAT]:
    """Export translation: one bare ai.attn2onnx::ProbAttention node."""
    o, probs = a2o.ProbAttention(q, k, v, key_padding_mask, scale=scale, causal=causal)
    return o, probs
