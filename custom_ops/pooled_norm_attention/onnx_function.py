"""ONNX side of PooledNormAttention: schema, standard-op function body and export translation."""

from __future__ import annotations

from typing import Sequence

from onnx.defs import OpSchema
from onnxscript import BOOL, FLOAT, script
from onnxscript import opset23 as op
from onnxscript.values import Opset

from .._common import DOMAIN, FLAG, NEG, OPSET_VERSION, AttrRule, OpRules, make_schema

a2o = Opset(DOMAIN, OPSET_VERSION)

# Upper bound of a pooling factor (every head gathers max(factors) keys per window slot).
MAX_FACTOR = 1 << 16

RULES = OpRules(
    attributes=(
        AttrRule("factors", min=1, max=MAX_FACTOR, length="N"),
        AttrRule("normalize", choices=FLAG),
        AttrRule("eps", above=0),
        AttrRule("beta"),
        AttrRule("rescale", choices=FLAG),
        AttrRule("scale"),
    ),
    inputs={"q": "B T N d", "k": "B S N d", "v": "B S N d", "key_padding_mask": "B S"},
)

SCHEMA = make_schema(
    "PooledNormAttention",
    "Attention-SH (per-head key/value pooling) and Attention-BN (key-statistics normalisation), or both.",
    inputs=[("q", "T", ""), ("k", "T", ""), ("v", "T", ""), ("key_padding_mask", "tensor(bool)", "")],
    outputs=[("o", "T")],
    attributes=[
        ("factors", OpSchema.AttrType.INTS, "pooling factor per head (all 1 = no pooling)"),
        ("normalize", OpSchema.AttrType.INT, "1: BN normalisation with the (pooled) key statistics"),
        ("eps", OpSchema.AttrType.FLOAT, "variance epsilon"),
        ("beta", OpSchema.AttrType.FLOAT, "weight of the subtracted key mean"),
        ("rescale", OpSchema.AttrType.INT, "1: divide by sqrt(var + eps); 0: centre only"),
        ("scale", OpSchema.AttrType.FLOAT, "logit scale, 0 = 1/sqrt(d)"),
    ],
    required=RULES.required,
)


@script(a2o, default_opset=op)
def PooledNormAttention(
    q,
    k,
    v,
    key_padding_mask,
    factors: Sequence[int],
    normalize: int = 0,
    eps: float = 1e-5,
    beta: float = 1.0,
    rescale: int = 1,
    scale: float = 0.0,
):
    """Standard-op body for any factor list. Window j of head h covers keys j*r_h .. j*r_h+r_h-1:
    every head gathers S window slots of max(r) keys each (O(N S max(r) d), no S x S matrix),
    averages the real ones; windows past the end or without a real key are empty and masked.
    Then the masked key statistics, then masked softmax attention over the pooled keys."""
    zero_i, one_i = op.Constant(value_int=0), op.Constant(value_int=1)
    factor = op.Constant(value_ints=factors)  # [N]
    n_heads = op.Shape(factor)
    s_len = op.Shape(k, start=1, end=2)  # [1]
    r_max = op.ReduceMax(factor, keepdims=0)
    slots = op.Range(zero_i, op.Squeeze(s_len), one_i)  # window index j: [S]
    offsets = op.Range(zero_i, r_max, one_i)  # key within the window: [R]
    start = op.Mul(op.Unsqueeze(factor, op.Constant(value_ints=[1])), op.Unsqueeze(slots, op.Constant(value_ints=[0])))
    idx = op.Add(
        op.Unsqueeze(start, op.Constant(value_ints=[2])), op.Unsqueeze(offsets, op.Constant(value_ints=[0, 1]))
    )
    in_window = op.And(
        op.Less(
            op.Unsqueeze(offsets, op.Constant(value_ints=[0, 1])), op.Unsqueeze(factor, op.Constant(value_ints=[1, 2]))
        ),
        op.Less(idx, s_len),
    )  # [N,S,R]
    idx = op.Min(idx, op.Sub(s_len, one_i))
    flat_idx = op.Reshape(idx, op.Constant(value_ints=[-1]))  # [N*S*R]
    head_base = op.Mul(op.Range(zero_i, op.Squeeze(n_heads), one_i), op.Squeeze(s_len))  # h*S: [N]
    global_idx = op.Reshape(
        op.Add(idx, op.Unsqueeze(head_base, op.Constant(value_ints=[1, 2]))), op.Constant(value_ints=[-1])
    )
    real = op.Gather(key_padding_mask, flat_idx, axis=1)  # [B, N*S*R]
    batch = op.Shape(k, start=0, end=1)
    grid = op.Concat(batch, n_heads, s_len, op.Reshape(r_max, op.Constant(value_ints=[-1])), axis=0)
    member = op.And(op.Reshape(real, grid), op.Unsqueeze(in_window, op.Constant(value_ints=[0])))  # [B,N,S,R]
    member_f = op.CastLike(member, q)
    one = op.CastLike(op.Constant(value_float=1.0), q)
    sizes = op.ReduceSum(member_f, op.Constant(value_ints=[3]), keepdims=0)  # [B,N,S]
    window_ok = op.Unsqueeze(
        op.Greater(sizes, op.CastLike(op.Constant(value_float=0.0), q)), op.Constant(value_ints=[3])
    )  # [B,N,S',1]
    inv_size = op.Unsqueeze(op.Div(one, op.Max(sizes, one)), op.Constant(value_ints=[3]))
    weights = op.Unsqueeze(member_f, op.Constant(value_ints=[4]))  # [B,N,S,R,1]
    heads_flat = op.Concat(batch, op.Constant(value_ints=[-1]), op.Shape(k, start=3, end=4), axis=0)
    pooled_shape = op.Concat(grid, op.Shape(k, start=3, end=4), axis=0)  # [B,N,S,R,d]
    k_rows = op.Reshape(op.Transpose(k, perm=[0, 2, 1, 3]), heads_flat)  # [B, N*S, d]
    v_rows = op.Reshape(op.Transpose(v, perm=[0, 2, 1, 3]), heads_flat)
    sum_axis = op.Constant(value_ints=[3])
    k_pool = op.Mul(
        op.ReduceSum(
            op.Mul(op.Reshape(op.Gather(k_rows, global_idx, axis=1), pooled_shape), weights), sum_axis, keepdims=0
        ),
        inv_size,
    )  # [B,N,S',d]
    v_pool = op.Mul(
        op.ReduceSum(
            op.Mul(op.Reshape(op.Gather(v_rows, global_idx, axis=1), pooled_shape), weights), sum_axis, keepdims=0
        ),
        inv_size,
    )
    qh = op.Transpose(q, perm=[0, 2, 1, 3])

    # BN: masked mean / variance of the pooled keys per (batch, head, channel)
    ok_f = op.CastLike(window_ok, q)
    token_axis = op.Constant(value_ints=[2])
    n_real = op.Max(op.ReduceSum(ok_f, token_axis, keepdims=1), one)  # [B,N,1,1]
    mu = op.Div(op.ReduceSum(op.Mul(k_pool, ok_f), token_axis, keepdims=1), n_real)  # [B,N,1,d]
    centred = op.Sub(k_pool, mu)
    var = op.Div(op.ReduceSum(op.Mul(op.Mul(centred, centred), ok_f), token_axis, keepdims=1), n_real)
    shift = op.Mul(mu, op.CastLike(op.Constant(value_float=beta), q))
    std = op.Sqrt(op.Add(var, op.CastLike(op.Constant(value_float=eps), q)))
    std = op.Where(op.Cast(op.Constant(value_int=rescale), to=9), std, one)
    do_norm = op.Cast(op.Constant(value_int=normalize), to=9)
    qh = op.Where(do_norm, op.Div(op.Sub(qh, shift), std), qh)
    k_pool = op.Where(do_norm, op.Div(op.Sub(k_pool, shift), std), k_pool)

    scale_attr = op.Constant(value_float=scale)
    head_dim = op.Cast(op.Shape(q, start=3, end=4), to=1)
    default_scale = op.Reciprocal(op.Sqrt(head_dim))
    scale_val = op.Where(op.Equal(scale_attr, op.Constant(value_float=0.0)), default_scale, scale_attr)
    logits = op.Mul(op.MatMul(qh, op.Transpose(k_pool, perm=[0, 1, 3, 2])), op.CastLike(scale_val, q))  # [B,N,T,S']
    allowed = op.Transpose(window_ok, perm=[0, 1, 3, 2])  # [B,N,1,S']
    probs = op.Softmax(op.Where(allowed, op.Cast(logits, to=1), op.Constant(value_float=NEG)), axis=-1)
    o = op.MatMul(op.CastLike(probs, q), v_pool)  # [B,N,T,d]
    return op.Transpose(o, perm=[0, 2, 1, 3])


@script(a2o)
def translate_pooled_norm_attention(
    q: FLOAT,
    k: FLOAT,
    v: FLOAT,
    key_padding_mask: BOOL,
    factors: Sequence[int],
    normalize: bool,
    eps: float,
    beta: float,
    rescale: bool,
    scale: float,
) -> FLOAT:
    """Export translation: one bare ai.attn2onnx::PooledNormAttention node."""
    return a2o.PooledNormAttention(
        q,
        k,
        v,
        key_padding_mask,
        factors=factors,
        normalize=normalize,
        eps=eps,
        beta=beta,
        rescale=rescale,
        scale=scale,
    )
