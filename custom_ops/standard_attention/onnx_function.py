"""ONNX side of StandardAttention: schema, standard-op function body and export translation.

q [B,T,N*d], k [B,S,Hk*d], v [B,S,Hk*dv] (com.microsoft.MultiHeadAttention's layout: a lowering
feeds the projections' outputs with no reshape), key_padding_mask bool [B,S] (True = real key);
attributes num_heads N, kv_num_heads Hk (0: N; query head h reads kv head h // (N / Hk)), scale
(0: 1/sqrt(d)), causal (query t sits at t + S - T and sees keys s <= t + S - T) and window (W > 0,
with causal: only the W most recent keys, the query's own included). Output o [B,T,N*dv].
"""

from __future__ import annotations

from onnx.defs import OpSchema
from onnxscript import BOOL, FLOAT, script
from onnxscript import opset23 as op
from onnxscript.values import Opset

from .._common import DOMAIN, FLAG, FLOAT_TYPES, NEG, OPSET_VERSION, AttrRule, OpRules, Rule, make_schema

a2o = Opset(DOMAIN, OPSET_VERSION)

RULES = OpRules(
    attributes=(
        AttrRule("num_heads", min=1),
        AttrRule("kv_num_heads", min=0),
        AttrRule("scale"),
        AttrRule("causal", choices=FLAG),
        AttrRule("window", min=0),
    ),
    inputs={"q": "B T Q", "k": "B S K", "v": "B S V", "key_padding_mask": "B S"},
    rules=(
        Rule(
            "window > 0 only with causal = 1", ("window", "causal"), lambda window, causal: window == 0 or causal == 1
        ),
        Rule(
            "kv_num_heads 0 or a divisor of num_heads",
            ("num_heads", "kv_num_heads"),
            lambda num_heads, kv_num_heads: kv_num_heads == 0 or num_heads % kv_num_heads == 0,
        ),
        Rule("q's last dim a multiple of num_heads", ("Q", "num_heads"), lambda Q, num_heads: Q % num_heads == 0),
        Rule(
            "k's last dim = kv heads * (q's last dim / num_heads)",
            ("Q", "K", "num_heads", "kv_num_heads"),
            lambda Q, K, num_heads, kv_num_heads: K * num_heads == Q * (kv_num_heads or num_heads),
        ),
        Rule(
            "v's last dim a multiple of the kv heads",
            ("V", "num_heads", "kv_num_heads"),
            lambda V, num_heads, kv_num_heads: V % (kv_num_heads or num_heads) == 0,
        ),
    ),
)

SCHEMA = make_schema(
    "StandardAttention",
    "Masked softmax attention on [B,T,D] tensors: o = softmax(where(allowed, q k^T * scale, NEG)) v per "
    "head, softmax in fp32; allowed = real key and (causal) s <= t + S - T (window: > t + S - T - W). "
    "A row with no allowed key is uniform over all keys.",
    inputs=[("q", "T", ""), ("k", "T", ""), ("v", "T", ""), ("key_padding_mask", "tensor(bool)", "")],
    outputs=[("o", "T")],
    attributes=[
        ("num_heads", OpSchema.AttrType.INT, "query heads N (q's last dim is N*d)"),
        ("kv_num_heads", OpSchema.AttrType.INT, "key / value heads Hk dividing N; 0 means N"),
        ("scale", OpSchema.AttrType.FLOAT, "logit scale; 0 means 1/sqrt(d)"),
        ("causal", OpSchema.AttrType.INT, "1: query t sees keys s <= t + S - T"),
        ("window", OpSchema.AttrType.INT, "W > 0: only the W most recent keys (needs causal); 0: none"),
    ],
    type_constraints=[("T", FLOAT_TYPES, "float tensors")],
    required=RULES.required,
)


@script(a2o, default_opset=op)
def StandardAttention(
    q,
    k,
    v,
    key_padding_mask,
    num_heads: int,
    kv_num_heads: int = 0,
    scale: float = 0.0,
    causal: int = 0,
    window: int = 0,
):
    """Standard-op body (fp32 inside): heads split, kv heads repeated, masked softmax, P v."""
    heads = op.Constant(value_int=num_heads)
    given_kv = op.Constant(value_int=kv_num_heads)
    zero = op.Constant(value_int=0)
    one = op.Constant(value_int=1)
    kv_heads = op.Where(op.Equal(given_kv, zero), heads, given_kv)
    b = op.Shape(q, start=0, end=1)
    t = op.Shape(q, start=1, end=2)
    s = op.Shape(k, start=1, end=2)
    minus_one = op.Constant(value_ints=[-1])
    heads_1d = op.Unsqueeze(heads, zero)
    kv_1d = op.Unsqueeze(kv_heads, zero)
    qh = op.Transpose(op.Reshape(op.Cast(q, to=1), op.Concat(b, t, heads_1d, minus_one, axis=0)), perm=[0, 2, 1, 3])
    k4 = op.Reshape(op.Cast(k, to=1), op.Concat(b, s, kv_1d, minus_one, axis=0))  # [B,S,Hk,d]
    v4 = op.Reshape(op.Cast(v, to=1), op.Concat(b, s, kv_1d, minus_one, axis=0))
    # [B,S,Hk,d] -> [B,S,Hk,rep,d] -> [B,S,N,d]: query head h reads kv head h // rep
    rep_1d = op.Div(heads_1d, kv_1d)
    one_1d = op.Constant(value_ints=[1])
    k5 = op.Unsqueeze(k4, op.Constant(value_ints=[3]))
    v5 = op.Unsqueeze(v4, op.Constant(value_ints=[3]))
    k_full = op.Reshape(
        op.Expand(k5, op.Concat(b, s, kv_1d, rep_1d, one_1d, axis=0)),
        op.Concat(b, s, heads_1d, minus_one, axis=0),
    )
    v_full = op.Reshape(
        op.Expand(v5, op.Concat(b, s, kv_1d, rep_1d, one_1d, axis=0)), op.Concat(b, s, heads_1d, minus_one, axis=0)
    )
    kt = op.Transpose(k_full, perm=[0, 2, 3, 1])  # [B,N,d,S]
    vh = op.Transpose(v_full, perm=[0, 2, 1, 3])  # [B,N,S,dv]
    head_dim = op.Cast(op.Shape(qh, start=3, end=4), to=1)
    given = op.Constant(value_float=scale)
    factor = op.Where(op.Equal(given, op.Constant(value_float=0.0)), op.Reciprocal(op.Sqrt(head_dim)), given)
    logits = op.Mul(op.MatMul(qh, kt), factor)  # [B,N,T,S]
    # allowed [B,1,T,S]: real key, and with causal 0 <= distance (< window)
    rows = op.Add(op.Range(zero, op.Squeeze(t), one), op.Squeeze(op.Sub(s, t)))
    cols = op.Range(zero, op.Squeeze(s), one)
    distance = op.Sub(op.Unsqueeze(rows, op.Constant(value_ints=[1])), op.Unsqueeze(cols, op.Constant(value_ints=[0])))
    width = op.Constant(value_int=window)
    in_window = op.Or(op.Equal(width, zero), op.Less(distance, width))
    causal_ok = op.And(op.GreaterOrEqual(distance, zero), in_window)
    position_ok = op.Or(op.Not(op.Cast(op.Constant(value_int=causal), to=9)), causal_ok)  # [T,S]
    allowed = op.And(op.Unsqueeze(key_padding_mask, op.Constant(value_ints=[1, 2])), position_ok)
    probs = op.Softmax(op.Where(allowed, logits, op.Constant(value_float=NEG)), axis=-1)
    o = op.Transpose(op.MatMul(probs, vh), perm=[0, 2, 1, 3])  # [B,T,N,dv]
    o3 = op.Reshape(o, op.Concat(b, t, minus_one, axis=0))
    return op.CastLike(o3, q)


@script(a2o)
def translate_standard_attention(
    q: FLOAT,
    k: FLOAT,
    v: FLOAT,
    key_padding_mask: BOOL,
    num_heads: int,
    kv_num_heads: int,
    scale: float,
    causal: bool,
    window: int,
) -> FLOAT:
    """Export translation: one bare ai.attn2onnx::StandardAttention node."""
    return a2o.StandardAttention(
        q,
        k,
        v,
        key_padding_mask,
        num_heads=num_heads,
        kv_num_heads=kv_num_heads,
        scale=scale,
        causal=causal,
        window=window,
    )
