"""ONNX side of SuperMix: schema, standard-op function body and export translation."""

from __future__ import annotations

from onnx.defs import OpSchema
from onnxscript import BOOL, FLOAT, script
from onnxscript import opset23 as op
from onnxscript.values import Opset

from .._common import DOMAIN, FLAG, OPSET_VERSION, AttrRule, OpRules, Rule, make_schema

a2o = Opset(DOMAIN, OPSET_VERSION)

RULES = OpRules(
    attributes=(AttrRule("causal", choices=FLAG),),
    inputs={"x": "B T D", "wa": "L L", "key_padding_mask": "B T"},
    rules=(Rule("a sequence length T <= wa's size Lmax", ("T", "L"), lambda T, L: T <= L),),
)

SCHEMA = make_schema(
    "SuperMix",
    "U = WA[:T,:T] x, WA lower-triangular when causal, padded rows of x zeroed first.",
    inputs=[("x", "T", ""), ("wa", "T", ""), ("key_padding_mask", "tensor(bool)", "")],
    outputs=[("u", "T")],
    attributes=[("causal", OpSchema.AttrType.INT, "1: mask WA to its lower triangle")],
    type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "float tensors")],
    required=RULES.required,
)


@script(a2o, default_opset=op)
def SuperMix(x, wa, key_padding_mask, causal: int = 0):
    """Standard-op body: slice WA to [T,T], optional tril, zero padded rows, MatMul."""
    t = op.Shape(x, start=1, end=2)
    zero = op.Constant(value_ints=[0])
    mix = op.Slice(wa, op.Concat(zero, zero, axis=0), op.Concat(t, t, axis=0))
    is_causal = op.Cast(op.Constant(value_int=causal), to=9)
    mix = op.Where(is_causal, op.Trilu(mix, upper=0), mix)
    keep = op.CastLike(op.Unsqueeze(key_padding_mask, op.Constant(value_ints=[-1])), x)
    x = op.Mul(x, keep)
    return op.MatMul(mix, x)


@script(a2o)
def translate_super_mix(x: FLOAT, wa: FLOAT, key_padding_mask: BOOL, causal: bool) -> FLOAT:
    """Export translation: one bare ai.attn2onnx::SuperMix node."""
    return a2o.SuperMix(x, wa, key_padding_mask, causal=causal)
