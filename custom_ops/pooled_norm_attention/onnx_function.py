"""ONNX side of PooledNormAttention: schema, standard-op function body and export translation."""
from __future__ import annotations

from typing import Sequence

from onnx.defs import OpSchema
from onnxscript import BOOL, FLOAT, script
from onnxscript import opset23 as op
from onnxscript.values import Opset

from .._common import DOMAIN, NEG, OPSET_VERSION, make_schema

a2o = Opset(DOMAIN, OPSET_VERSION)

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
)


@script(a2o, default_opset=op)
def PooledNormAttention(
    q, k, v, key_padding_mask,
    factors: Sequence[int], normalize: int = 0, eps: float = 1e-5, beta: float = 1.0, rescale: int = 1,
    scale: float = 0.0,
):
    """Standard-op body for any factor list: a per-head [B,N,S,S] averaging matrix (window j of
    head h averages the real keys s with floor(s / r_h) = j; windows past the end are empty and
    masked), the masked key statistics, then masked softmax attention over the pooled keys."""
    factor = op.Unsqueeze(op.Constant(value_ints=factors), op.Constant(value_ints=[1]))  # [N,1]
    keys = op.Range(op.Constant(value_int=0), op.Squeeze(op.Shape(k, start=1, end=2)), op.Constant(value_int=1))
    window = op.Div(op.Unsqueeze(keys, op.Constant(value_ints=[0])), factor)  # [N,S]: window of key s in head h
    member = op.Equal(
        op.Unsqueeze(window, op.Constant(value_ints=[1])), op.Unsqueeze(keys, op.Constant(value_ints=[0, 2]))
    )  # [N,S',S] with S' = S window slots
    member = op.And(op.Unsqueeze(member, op.Constant(value_ints=[0])),
                    op.Unsqueeze(key_padding_mask, op.Constant(value_ints=[1, 2])))  # [B,N,S',S]
    member_f = op.CastLike(member, q)
    one = op.CastLike(op.Constant(value_float=1.0), q)
    sizes = op.ReduceSum(member_f, op.Constant(value_ints=[3]), keepdims=1)  # [B,N,S',1]
    weights = op.Div(member_f, op.Max(sizes, one))
    window_ok = op.Greater(sizes, op.CastLike(op.Constant(value_float=0.0), q))  # [B,N,S',1]
    k_pool = op.MatMul(weights, op.Transpose(k, perm=[0, 2, 1, 3]))  # [B,N,S',d]
    v_pool = op.MatMul(weights, op.Transpose(v, perm=[0, 2, 1, 3]))
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
    q: FLOAT, k: FLOAT, v: FLOAT, key_padding_mask: BOOL,
    factors: Sequence[int], normalize: bool, eps: float, beta: float, rescale: bool, scale: float,
) -> FLOAT:
    """Export translation: one bare ai.attn2onnx::PooledNormAttention node."""
    return a2o.PooledNormAttention(
        q, k, v, key_padding_mask,
        factors=factors, normalize=normalize, eps=eps, beta=beta, rescale=rescale, scale=scale,
    )
