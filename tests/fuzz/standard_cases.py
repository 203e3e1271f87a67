"""Hostile and edge-case runs of the StandardAttention C++ kernel in a plain ONNX Runtime session,
on the machinery of :mod:`fuzz.native_cases` (one forked child per case, JSON lines back).

Every case runs with the contract's output shape or ends in one ONNX Runtime error (at load, or
the kernel's INVALID_ARGUMENT at run), never in a signal or a hang: wrong ranks and shapes, heads
that do not divide, empty input names, zero sizes, T > S and S > T with windows, huge and
ill-typed attributes, mask bytes other than 0 / 1, NaN / inf inputs.

    python -m fuzz.standard_cases LIBRARY [CASE ...]     (from tests/)
"""

from __future__ import annotations

import sys
from dataclasses import replace

from onnx import TensorProto

from .native_cases import INT64_MAX, Case, main

OP = "StandardAttention"
ARGS = ("q", "k", "v", "key_padding_mask")


def valid(kind: str, name: str, b=1, t=5, s=7, n=2, hk=0, d=4, dv=None, **attrs) -> Case:
    """A well-formed call: q [B,T,N*d], k [B,S,Hk*d], v [B,S,Hk*dv]."""
    kv = hk or n
    shapes = {"q": (b, t, n * d), "k": (b, s, kv * d), "v": (b, s, kv * (d if dv is None else dv))}
    shapes["key_padding_mask"] = (b, s)
    attrs = {"num_heads": n, "kv_num_heads": hk} | attrs
    out = (b, t, n * (d if dv is None else dv))
    return Case(kind, name, ARGS, shapes, attrs, "ok", out, op=OP)


def refused(kind: str, name: str, base: Case | None = None, **changes) -> Case:
    """``base`` (default: a well-formed call) with ``changes``, expected to end in an ORT error."""
    base = base or valid(kind, name)
    fields = {"kind": kind, "name": name, "expect": "error", "out_shape": None}
    shapes = {**base.shapes, **changes.pop("shapes", {})}
    attrs = {**base.attrs, **changes.pop("attrs", {})}
    return Case(**{**base.__dict__, **fields, "shapes": shapes, "attrs": attrs, **changes})


def cases() -> list[Case]:
    out = [
        # shapes
        refused("shape", "q-rank-4", shapes={"q": (1, 5, 2, 4)}),
        refused("shape", "q-not-heads", shapes={"q": (1, 5, 7)}),
        refused("shape", "k-width", shapes={"k": (1, 7, 9)}),
        refused("shape", "k-batch", shapes={"k": (2, 7, 8)}),
        refused("shape", "v-length", shapes={"v": (1, 6, 8)}),
        refused("shape", "v-not-kv-heads", shapes={"v": (1, 7, 7)}),
        refused("shape", "mask-length", shapes={"key_padding_mask": (1, 6)}),
        refused("shape", "mask-rank-4", shapes={"key_padding_mask": (1, 1, 1, 7)}),
        refused("type", "mask-int32", types={"key_padding_mask": TensorProto.INT32}),
        refused("type", "k-double", types={"k": TensorProto.DOUBLE}),
        # names written empty or left off
        *(refused("name", f"empty-{i}", args=tuple("" if j == i else a for j, a in enumerate(ARGS))) for i in range(4)),
        refused("name", "three-inputs", args=ARGS[:3]),
        refused("name", "empty-output", outputs=("",)),
        # heads
        refused("attribute", "heads-missing", attrs={"num_heads": None}),
        refused("attribute", "heads-0", attrs={"num_heads": 0}),
        refused("attribute", "heads-negative", attrs={"num_heads": -2}),
        refused("attribute", "heads-max", attrs={"num_heads": INT64_MAX}),
        refused("attribute", "kv-heads-not-dividing", valid("attribute", "", n=4, hk=3, d=2)),
        refused("attribute", "kv-heads-negative", attrs={"kv_num_heads": -1}),
        refused("attribute", "heads-float", attrs={"num_heads": 2.0}),
        refused("attribute", "window-not-causal", attrs={"window": 3}),
        refused("attribute", "window-negative", attrs={"causal": 1, "window": -1}),
        refused("attribute", "scale-int", attrs={"scale": 3}),
        valid("attribute", "window-max", causal=1, window=INT64_MAX),
        valid("attribute", "causal-min", causal=-(2**63)),
        valid("attribute", "scale-nan", scale=float("nan")),
        valid("attribute", "scale-inf", scale=float("inf")),
        valid("attribute", "gqa", n=4, hk=2, causal=1),
        # zero sizes and lengths
        *(
            valid("zero", k, **v)
            for k, v in {"B0": dict(b=0), "T0": dict(t=0), "S0": dict(s=0), "S0-T70": dict(t=70, s=0)}.items()
        ),
        valid("zero", "d0", d=0, dv=4),
        valid("zero", "dv0", dv=0),
        *(
            valid("length", f"T{t}-S{s}-w{w}", t=t, s=s, causal=1, window=w)
            for t, s in [(6, 3), (70, 5), (3, 40), (1, 1), (65, 300)]
            for w in (0, 2)
        ),
        # values
        Case(
            "value",
            "mask-byte-2",
            ARGS,
            valid("", "").shapes,
            valid("", "").attrs,
            "ok",
            (1, 5, 8),
            raw_bool={"key_padding_mask": 2},
            op=OP,
        ),
        valid("value", "nan-inf", causal=1),
        replace(valid("value", "fp16", causal=1), elem=TensorProto.FLOAT16),
    ]
    for case in out:  # an attribute given as None is left off the node
        for key in [k for k, v in case.attrs.items() if v is None]:
            del case.attrs[key]
    return out


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], cases()))
