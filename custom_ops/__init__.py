"""The ``ai.attn2onnx`` op set (version 1): one folder per op, every backend side by side.

Importing this package registers every op's schema with onnx and its standard-op function body,
rules and backends in :data:`REGISTRY`: all that loading, checking, optimising and running a graph
needs, with onnx and onnxscript and no torch. :func:`function_protos` gives the bodies to attach
to exported models.

The torch side (``torch.ops.attn2onnx.*``, each op's PyTorch reference as its eager body) is
imported on first use: importing :mod:`.torch_ops` registers every op with torch, and
:func:`translation_table` (for ``torch.onnx.export``) and :func:`decompositions` load it.
"""

from __future__ import annotations

import onnx

from ._common import DOMAIN, OPSET_VERSION, REFERENCES, REGISTRY, OpDef
from . import super_mix  # noqa: F401  (registers the op)
from . import prob_attention  # noqa: F401
from . import landmark_attention  # noqa: F401
from . import pooled_norm_attention  # noqa: F401
from . import dcmha_compose  # noqa: F401  (registers the op)
from . import dcmha_attention  # noqa: F401  (registers the op)
from . import cache_update  # noqa: F401  (registers the op)
from . import standard_attention  # noqa: F401  (registers the op)
from ._validation import InvalidModelError, check_model


def translation_table() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export``: torch overload -> translation
    (registers the ops with torch)."""
    return {opdef.overload_packet: opdef.translation for opdef in REGISTRY.values()}


def decompositions() -> dict:
    """torch overload -> reference implementation: ``ExportedProgram.run_decompositions``
    with this table turns every attn2onnx op into the plain aten ops of its reference (what
    a stock exporter sees in a model written without attn2onnx). Registers the ops with torch."""
    return {opdef.overload_packet: REFERENCES[opdef.torch_op._qualname] for opdef in REGISTRY.values()}


def function_protos() -> dict[str, onnx.FunctionProto]:
    """Op type -> FunctionProto (domain ai.attn2onnx) with the op's standard-op body."""
    return {name: opdef.function_proto() for name, opdef in REGISTRY.items()}


__all__ = [
    "DOMAIN",
    "OPSET_VERSION",
    "REGISTRY",
    "InvalidModelError",
    "OpDef",
    "check_model",
    "decompositions",
    "function_protos",
    "translation_table",
]
