"""ONNX side of CacheUpdate: schema, standard-op function body and export translation.

The body (Slice, Concat) is what a runtime without the native kernel runs: a new tensor, the
buffer with its rows [position, position + T) replaced. The native kernel computes the same
and, given the buffer itself as the output, writes only those rows.
"""

from __future__ import annotations

from onnxscript import FLOAT, INT64, script
from onnxscript import opset23 as op
from onnxscript.values import Opset

from .._common import DOMAIN, FLOAT_TYPES, OPSET_VERSION, OpRules, Rule, make_schema

a2o = Opset(DOMAIN, OPSET_VERSION)

RULES = OpRules(
    attributes=(),
    inputs={
        "buffer": ("B S a", "B S a b", "B S a b c"),
        "new_rows": ("B T a", "B T a b", "B T a b c"),
        "position": ("", "1"),
    },
    rules=(Rule("new rows T <= the buffer's positions S", ("T", "S"), lambda T, S: T <= S),),
)

SCHEMA = make_schema(
    "CacheUpdate",
    "out = buffer with out[:, position:position+T] = new_rows (buffer [B,S,...], new_rows [B,T,...], "
    "position int64 scalar or [1], 0 <= position <= S - T). Native kernel: in place when the output "
    "is the buffer's memory (past and present bound to one buffer).",
    inputs=[("buffer", "T", ""), ("new_rows", "T", ""), ("position", "tensor(int64)", "")],
    outputs=[("out", "T")],
    type_constraints=[("T", FLOAT_TYPES, "float tensors")],
)


@script(a2o, default_opset=op)
def CacheUpdate(buffer, new_rows, position):
    """Standard-op body: Concat(buffer[:, :position], new_rows, buffer[:, position + T:])."""
    axis = op.Constant(value_ints=[1])
    start = op.Reshape(position, op.Constant(value_ints=[1]))
    end = op.Add(start, op.Shape(new_rows, start=1, end=2))
    before = op.Slice(buffer, op.Constant(value_ints=[0]), start, axis)
    after = op.Slice(buffer, end, op.Shape(buffer, start=1, end=2), axis)
    return op.Concat(before, op.CastLike(new_rows, buffer), after, axis=1)


@script(a2o)
def translate_cache_update(buffer: FLOAT, new_rows: FLOAT, position: INT64) -> FLOAT:
    """Export translation: one bare ai.attn2onnx::CacheUpdate node."""
    return a2o.CacheUpdate(buffer, new_rows, position)
