"""ONNX side of DcmhaCompose: schema, standard-op function body and export translation."""

from __future__ import annotations

from onnx.defs import OpSchema
from onnxscript import FLOAT, script
from onnxscript import opset23 as op
from onnxscript.values import Opset

from .._common import DOMAIN, FLAG, FLOAT_TYPES, OPSET_VERSION, AttrRule, OpRules, Rule, make_schema

a2o = Opset(DOMAIN, OPSET_VERSION)

# Factor rows F = 2R+1 (U, V, gate): always odd.
ODD_FACTOR_ROWS = Rule("factor rows F = 2R+1 (odd)", ("F",), lambda F: F % 2 == 1)

RULES = OpRules(
    attributes=(AttrRule("use_static_mix", choices=FLAG),),
    inputs={"a": "B N T S", "q_factors": "B T F N", "k_factors": "B S F N", "static_mix": "N N"},
    rules=(ODD_FACTOR_ROWS,),
)

SCHEMA = make_schema(
    "DcmhaCompose",
    "One DCMHA compose step on a [B,N,T,S] tensor: per (t,s) the head vector a becomes "
    "a + (a U_t^T) V_t + (a U_s^T) V_s + a*g_t + a*g_s (+ a Wb when use_static_mix).",
    inputs=[
        ("a", "T", ""),
        ("q_factors", "T", ""),
        ("k_factors", "T", ""),
        ("static_mix", "T", ""),
    ],
    outputs=[("a_out", "T")],
    attributes=[("use_static_mix", OpSchema.AttrType.INT, "1: add a Wb (static head mix)")],
    type_constraints=[("T", FLOAT_TYPES, "float tensors")],
    required=RULES.required,
)


@script(a2o, default_opset=op)
def DcmhaCompose(a, q_factors, k_factors, static_mix, use_static_mix: int = 0):
    """Standard-op body in factorised form (fp32): per query token t the [S,N] slab of heads is
    multiplied by U_t^T [N,R] then V_t [R,N]; per key token s likewise with the [T,N] slab."""
    rows = op.Shape(q_factors, start=2, end=3)
    one = op.Constant(value_ints=[1])
    rank = op.Div(op.Sub(rows, one), op.Constant(value_ints=[2]))
    sizes = op.Concat(rank, rank, one, axis=0)
    uq, vq, gq = op.Split(op.Cast(q_factors, to=1), sizes, axis=2)  # [B,T,R,N] [B,T,R,N] [B,T,1,N]
    uk, vk, gk = op.Split(op.Cast(k_factors, to=1), sizes, axis=2)  # [B,S,R,N] [B,S,R,N] [B,S,1,N]
    x = op.Cast(a, to=1)
    x_ts = op.Transpose(x, perm=[0, 2, 3, 1])  # [B,T,S,N]
    x_st = op.Transpose(x, perm=[0, 3, 2, 1])  # [B,S,T,N]
    query_side = op.MatMul(op.MatMul(x_ts, op.Transpose(uq, perm=[0, 1, 3, 2])), vq)  # [B,T,S,N]
    key_side = op.MatMul(op.MatMul(x_st, op.Transpose(uk, perm=[0, 1, 3, 2])), vk)  # [B,S,T,N]
    out = op.Add(x_ts, query_side)
    out = op.Add(out, op.Transpose(key_side, perm=[0, 2, 1, 3]))
    out = op.Add(out, op.Mul(x_ts, gq))
    out = op.Add(out, op.Mul(x_ts, op.Transpose(gk, perm=[0, 2, 1, 3])))
    use = op.Cast(op.Constant(value_int=use_static_mix), to=9)
    if use:
        result = op.Add(out, op.MatMul(x_ts, op.Cast(static_mix, to=1)))
    else:
        result = op.Identity(out)
    return op.CastLike(op.Transpose(result, perm=[0, 3, 1, 2]), a)


@script(a2o)
def translate_dcmha_compose(
    a: FLOAT, q_factors: FLOAT, k_factors: FLOAT, static_mix: FLOAT, use_static_mix: bool
) -> FLOAT:
    """Export translation: one bare ai.attn2onnx::DcmhaCompose node."""
    return a2o.DcmhaCompose(a, q_factors, k_factors, static_mix, use_static_mix=use_static_mix)
