"""ONNX side of DcmhaAttention: schema, standard-op function body and export translation.

The body calls the DcmhaCompose function (same domain) for both composes, so a model that
holds DcmhaAttention must also carry DcmhaCompose among its functions (``function_protos()``
gives both).

The optional last input ``attn_mask`` has its own body, the function overload ``attn_mask``
(ONNX IR >= 10), because a function body cannot use an input its caller leaves out: ORT inlines
the missing input as "" into every node that reads it (an ``If`` on ``OptionalHasElement``
included) and rejects the graph. Nodes that pass the mask name that overload; the others keep
the plain body, bit for bit.
"""

from __future__ import annotations

from typing import Optional

import onnx
from onnx.defs import OpSchema
from onnxscript import BOOL, FLOAT, script
from onnxscript import opset23 as op
from onnxscript.values import Opset

from .._common import DOMAIN, FLAG, FLOAT_TYPES, NEG, OPSET_VERSION, AttrRule, OpRules, Overload, Rule, make_schema
from ..dcmha_compose.onnx_function import ODD_FACTOR_ROWS, DcmhaCompose

a2o = Opset(DOMAIN, OPSET_VERSION)

RULES = OpRules(
    attributes=(
        AttrRule("scale"),
        AttrRule("causal", choices=FLAG),
        AttrRule("window", min=0),
        AttrRule("use_static_mix", choices=FLAG),
    ),
    inputs={
        "q": "B T N d",
        "k": "B S N d",
        "v": "B S N dv",
        "q_factors": "B T 2 F N",
        "k_factors": "B S 2 F N",
        "key_padding_mask": "B S",
        "static_mix": "2 N N",
        # [T,S] or [B,N,T,S], every axis its size or 1 (broadcast)
        "attn_mask": ("T|1 S|1", "B|1 N|1 T|1 S|1"),
    },
    rules=(
        Rule(
            "window > 0 only with causal = 1", ("window", "causal"), lambda window, causal: window == 0 or causal == 1
        ),
        ODD_FACTOR_ROWS,
    ),
)

SCHEMA = make_schema(
    "DcmhaAttention",
    "DCMHA attention core: L = q k^T * scale; L = Compose(L, pre); masked softmax (fp32); "
    "P = Compose(P, post); o = P v. Causal aligned to the end of the keys. Optional attn_mask "
    "(bool [T,S] or [B,N,T,S], axes may be 1; true = may attend) is ANDed with the other masks.",
    inputs=[
        ("q", "T", ""),
        ("k", "T", ""),
        ("v", "T", ""),
        ("q_factors", "T", ""),
        ("k_factors", "T", ""),
        ("key_padding_mask", "tensor(bool)", ""),
        ("static_mix", "T", ""),
        ("attn_mask", "tensor(bool)", "optional"),
    ],
    outputs=[("o", "T")],
    attributes=[
        ("scale", OpSchema.AttrType.FLOAT, "logit scale; 0 means 1/sqrt(d)"),
        ("causal", OpSchema.AttrType.INT, "1: query t sees keys s <= t + S - T"),
        ("window", OpSchema.AttrType.INT, "W > 0: only the W most recent keys (needs causal); 0: none"),
        ("use_static_mix", OpSchema.AttrType.INT, "1: add a Wb in both composes"),
    ],
    type_constraints=[("T", FLOAT_TYPES, "float tensors")],
    required=RULES.required,
)


@script(a2o, default_opset=op)
def DcmhaAttention(
    q,
    k,
    v,
    q_factors,
    k_factors,
    key_padding_mask,
    static_mix,
    scale: float = 0.0,
    causal: int = 0,
    window: int = 0,
    use_static_mix: int = 0,
):
    """Standard-op body (fp32 inside): logits, pre compose, mask, softmax, post compose, P v."""
    qh = op.Transpose(op.Cast(q, to=1), perm=[0, 2, 1, 3])  # [B,N,T,d]
    kh = op.Transpose(op.Cast(k, to=1), perm=[0, 2, 3, 1])  # [B,N,d,S]
    vh = op.Transpose(op.Cast(v, to=1), perm=[0, 2, 1, 3])  # [B,N,S,d]
    head_dim = op.Cast(op.Shape(q, start=3, end=4), to=1)
    given = op.Constant(value_float=scale)
    zero_f = op.Constant(value_float=0.0)
    factor = op.Where(op.Equal(given, zero_f), op.Reciprocal(op.Sqrt(head_dim)), given)
    logits = op.Mul(op.MatMul(qh, kh), factor)  # [B,N,T,S]

    pre = op.Constant(value_int=0)
    post = op.Constant(value_int=1)
    logits = DcmhaCompose(
        logits,
        op.Cast(op.Gather(q_factors, pre, axis=2), to=1),
        op.Cast(op.Gather(k_factors, pre, axis=2), to=1),
        op.Cast(op.Gather(static_mix, pre, axis=0), to=1),
        use_static_mix=use_static_mix,
    )

    # allowed [B,1,T,S]: real key, and with causal 0 <= distance (< window)
    t = op.Shape(q, start=1, end=2)
    s = op.Shape(k, start=1, end=2)
    zero = op.Constant(value_int=0)
    one = op.Constant(value_int=1)
    rows = op.Add(op.Range(zero, op.Squeeze(t), one), op.Squeeze(op.Sub(s, t)))
    cols = op.Range(zero, op.Squeeze(s), one)
    distance = op.Sub(op.Unsqueeze(rows, op.Constant(value_ints=[1])), op.Unsqueeze(cols, op.Constant(value_ints=[0])))
    is_causal = op.Cast(op.Constant(value_int=causal), to=9)
    width = op.Constant(value_int=window)
    in_window = op.Or(op.Equal(width, zero), op.Less(distance, width))
    causal_ok = op.And(op.GreaterOrEqual(distance, zero), in_window)
    position_ok = op.Or(op.Not(is_causal), causal_ok)  # [T,S]
    key_ok = op.Unsqueeze(key_padding_mask, op.Constant(value_ints=[1, 2]))  # [B,1,1,S]
    allowed = op.And(key_ok, position_ok)
    logits = op.Where(allowed, logits, op.Constant(value_float=NEG))
    probs = op.Softmax(logits, axis=-1)

    probs = DcmhaCompose(
        probs,
        op.Cast(op.Gather(q_factors, post, axis=2), to=1),
        op.Cast(op.Gather(k_factors, post, axis=2), to=1),
        op.Cast(op.Gather(static_mix, post, axis=0), to=1),
        use_static_mix=use_static_mix,
    )
    o = op.Transpose(op.MatMul(probs, vh), perm=[0, 2, 1, 3])  # [B,T,N,d]
    return op.CastLike(o, q)


@script(a2o)
def translate_dcmha_attention(
    q: FLOAT,
    k: FLOAT,
    v: FLOAT,
    q_factors: FLOAT,
    k_factors: FLOAT,
    key_padding_mask: BOOL,
    static_mix: FLOAT,
    scale: float,
    causal: bool,
    window: int,
    use_static_mix: bool,
    attn_mask: Optional[BOOL] = None,
) -> FLOAT:
    """Export translation: one bare ai.attn2onnx::DcmhaAttention node (its overload is named when
    the body is attached: ``onnx_io.attach_functions``)."""
    return a2o.DcmhaAttention(
        q,
        k,
        v,
        q_factors,
        k_factors,
        key_padding_mask,
        static_mix,
        attn_mask,
        scale=scale,
        causal=causal,
        window=window,
        use_static_mix=use_static_mix,
    )


MASK_INPUT = "attn_mask"


def masked_body() -> onnx.FunctionProto:
    """The body of the ``attn_mask`` overload: the plain body with an 8th input ``attn_mask``
    ANDed into ``allowed`` (causal / window / key padding) right where the body forms it, so both
    bodies share every other node."""
    proto = DcmhaAttention.to_function_proto()
    proto.domain, proto.name, proto.overload = DOMAIN, "DcmhaAttention", MASK_INPUT
    proto.input.append(MASK_INPUT)
    index = next(i for i, node in enumerate(proto.node) if list(node.output) == ["allowed"])
    for node in proto.node[index + 1 :]:
        node.input[:] = ["allowed_by_mask" if name == "allowed" else name for name in node.input]
    proto.node.insert(index + 1, onnx.helper.make_node("And", ["allowed", MASK_INPUT], ["allowed_by_mask"]))
    return proto


# Nodes with 8 inputs run the masked body (nodes with 7, the plain one).
OVERLOADS = (Overload(MASK_INPUT, inputs=8, body=masked_body),)
