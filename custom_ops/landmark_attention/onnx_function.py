"""ONNX side of LandmarkAttention: schema, standard-op function body and export translation."""

from __future__ import annotations

import math

from onnx.defs import OpSchema
from onnxscript import BOOL, FLOAT, script
from onnxscript import opset23 as op
from onnxscript.values import Opset

from .._common import DOMAIN, NEG, OPSET_VERSION, AttrRule, OpRules, Rule, make_schema

a2o = Opset(DOMAIN, OPSET_VERSION)

_MIX_INPUTS = [
    (f"{stage}_{kind}_{side}", "T", "") for stage in ("pre", "post") for side in ("q", "k") for kind in ("mix", "bias")
]

# Upper bound of landmarks (the body builds [B, L, T] pooling matrices): far above any model's L.
MAX_LANDMARKS = 1 << 16

RULES = OpRules(
    attributes=(AttrRule("landmarks", min=1, max=MAX_LANDMARKS), AttrRule("grid", min=0), AttrRule("scale")),
    inputs={
        "q": "B T N d",
        "k": "B T N d",
        "v": "B T N d",
        "key_padding_mask": "B T",
        **{name: ("N" if "bias" in name else "N N") for name, _, _ in _MIX_INPUTS},
    },
    rules=(
        Rule(
            "landmarks = grid * grid when grid > 0",
            ("landmarks", "grid"),
            lambda landmarks, grid: grid == 0 or landmarks == grid * grid,
        ),
        Rule(
            "a square token map (T a perfect square) when grid > 0",
            ("grid", "T"),
            lambda grid, T: grid == 0 or math.isqrt(T) ** 2 == T,
        ),
    ),
)

SCHEMA = make_schema(
    "LandmarkAttention",
    "iMHSA: attention through L pooled landmarks with N x N head mixing before and after the softmax.",
    inputs=[("q", "T", ""), ("k", "T", ""), ("v", "T", ""), ("key_padding_mask", "tensor(bool)", "")] + _MIX_INPUTS,
    outputs=[("o", "T")],
    attributes=[
        ("landmarks", OpSchema.AttrType.INT, "number of landmarks L (grid**2 when grid > 0)"),
        ("grid", OpSchema.AttrType.INT, "0: 1-D segments; s > 0: s x s grid pooling of the token map"),
        ("scale", OpSchema.AttrType.FLOAT, "logit scale, 0 = 1/sqrt(d)"),
    ],
    required=RULES.required,
)


@script(a2o, default_opset=op)
def LandmarkAttention(
    q,
    k,
    v,
    key_padding_mask,
    pre_mix_q,
    pre_bias_q,
    pre_mix_k,
    pre_bias_k,
    post_mix_q,
    post_bias_q,
    post_mix_k,
    post_bias_k,
    landmarks: int = 16,
    grid: int = 0,
    scale: float = 0.0,
):
    """Standard-op body: a [B,L,T] masked averaging matrix built at run time (1-D: ranks by
    CumSum, segment ids by integer division; grid: cells of the row-major map), then the two
    thin attentions. For a T that is no perfect square (rejected by the PyTorch reference) the
    grid map has ceil(sqrt(T)) columns and ceil(T / columns) rows."""
    num = op.Constant(value_int=landmarks)
    side_cells = op.Constant(value_int=grid)
    use_grid = op.Greater(side_cells, op.Constant(value_int=0))
    zero_i = op.Constant(value_int=0)
    one = op.Constant(value_int=1)
    # 1-D: segment floor(rank * L / n) by rank among the real tokens of the row
    real = op.Cast(key_padding_mask, to=7)
    ranks = op.Sub(op.CumSum(real, one), one)  # [B,T]
    count = op.Max(op.ReduceSum(real, op.Constant(value_ints=[1]), keepdims=1), one)  # [B,1]
    segment_1d = op.Div(op.Mul(ranks, num), count)
    # grid: cell of token t on the row-major map of side = ceil(sqrt(T)) columns
    length = op.Shape(q, start=1, end=2)  # [1]
    positions = op.Unsqueeze(op.Range(zero_i, op.Squeeze(length), one), op.Constant(value_ints=[0]))  # [1,T]
    side = op.Max(op.Cast(op.Ceil(op.Sqrt(op.Cast(length, to=1))), to=7), one)
    rows = op.Max(op.Div(op.Sub(op.Add(length, side), one), side), one)
    row = op.Div(positions, side)
    col = op.Mod(positions, side)
    segment_grid = op.Add(
        op.Mul(op.Div(op.Mul(row, side_cells), rows), side_cells), op.Div(op.Mul(col, side_cells), side)
    )
    segment = op.Where(use_grid, segment_grid, segment_1d)  # [B,T]
    ids = op.Range(zero_i, num, one)  # [L]
    member = op.And(
        op.Equal(op.Unsqueeze(segment, op.Constant(value_ints=[1])), op.Unsqueeze(ids, op.Constant(value_ints=[0, 2]))),
        op.Unsqueeze(key_padding_mask, op.Constant(value_ints=[1])),
    )  # [B,L,T]
    member_f = op.CastLike(member, q)
    sizes = op.ReduceSum(member_f, op.Constant(value_ints=[2]), keepdims=1)  # [B,L,1]
    weights = op.Div(member_f, op.Max(sizes, op.CastLike(one, q)))
    landmark_ok = op.Greater(sizes, op.CastLike(op.Constant(value_int=0), q))  # [B,L,1]

    scale_attr = op.Constant(value_float=scale)
    head_dim = op.Cast(op.Shape(q, start=3, end=4), to=1)
    default_scale = op.Reciprocal(op.Sqrt(head_dim))
    scale_val = op.Where(op.Equal(scale_attr, op.Constant(value_float=0.0)), default_scale, scale_attr)
    scale_val = op.CastLike(scale_val, q)
    q_land = op.Einsum(weights, q, equation="blt,bthd->bhld")
    k_land = op.Einsum(weights, k, equation="blt,bthd->bhld")
    qh = op.Transpose(q, perm=[0, 2, 1, 3])
    kt = op.Transpose(k, perm=[0, 2, 3, 1])
    vh = op.Transpose(v, perm=[0, 2, 1, 3])
    bias_axes = op.Constant(value_ints=[1, 2])
    s_q = op.Mul(op.MatMul(qh, op.Transpose(k_land, perm=[0, 1, 3, 2])), scale_val)  # [B,N,T,L]
    s_k = op.Mul(op.MatMul(q_land, kt), scale_val)  # [B,N,L,S]
    s_q = op.Add(op.Einsum(pre_mix_q, s_q, equation="gh,bhtl->bgtl"), op.Unsqueeze(pre_bias_q, bias_axes))
    s_k = op.Add(op.Einsum(pre_mix_k, s_k, equation="gh,bhls->bgls"), op.Unsqueeze(pre_bias_k, bias_axes))

    neg = op.Constant(value_float=NEG)
    zero = op.CastLike(op.Constant(value_float=0.0), q)
    allowed_q = op.Unsqueeze(op.Transpose(landmark_ok, perm=[0, 2, 1]), op.Constant(value_ints=[1]))  # [B,1,1,L]
    allowed_k = op.Unsqueeze(key_padding_mask, bias_axes)  # [B,1,1,S]
    a_q = op.CastLike(op.Softmax(op.Where(allowed_q, op.Cast(s_q, to=1), neg), axis=-1), q)
    a_k = op.CastLike(op.Softmax(op.Where(allowed_k, op.Cast(s_k, to=1), neg), axis=-1), q)
    a_q = op.Add(op.Einsum(post_mix_q, a_q, equation="gh,bhtl->bgtl"), op.Unsqueeze(post_bias_q, bias_axes))
    a_k = op.Add(op.Einsum(post_mix_k, a_k, equation="gh,bhls->bgls"), op.Unsqueeze(post_bias_k, bias_axes))
    a_q = op.Where(allowed_q, a_q, zero)
    a_k = op.Where(allowed_k, a_k, zero)
    o = op.MatMul(a_q, op.MatMul(a_k, vh))  # [B,N,T,d]
    return op.Transpose(o, perm=[0, 2, 1, 3])


@script(a2o)
def translate_landmark_attention(
    q: FLOAT,
    k: FLOAT,
    v: FLOAT,
    key_padding_mask: BOOL,
    pre_mix_q: FLOAT,
    pre_bias_q: FLOAT,
    pre_mix_k: FLOAT,
    pre_bias_k: FLOAT,
    post_mix_q: FLOAT,
    post_bias_q: FLOAT,
    post_mix_k: FLOAT,
    post_bias_k: FLOAT,
    landmarks: int,
    grid: int,
    scale: float,
) -> FLOAT:
    """Export translation: one bare ai.attn2onnx::LandmarkAttention node."""
    return a2o.LandmarkAttention(
        q,
        k,
        v,
        key_padding_mask,
        pre_mix_q,
        pre_bias_q,
        pre_mix_k,
        pre_bias_k,
        post_mix_q,
        post_bias_q,
        post_mix_k,
        post_bias_k,
        landmarks=landmarks,
        grid=grid,
        scale=scale,
    )
