"""onnxscript's ONNX Runtime fusions as a stage of the ``ort`` pipeline.

``onnxscript.rewriter.ort_fusions.optimize_for_ort`` is the maintained rule set for what ORT's
com.microsoft ops fuse (SDPA / MultiHeadAttention / GQA forms, SkipLayerNormalization and
SkipSimplifiedLayerNormalization, Gelu / BiasGelu, rotary embeddings). It is used as it is, with
two guards:

* It runs the onnxscript optimizer with function inlining on, which would inline the standard-op
  bodies of our ``ai.attn2onnx`` ops (and the native kernels would no longer be called). The
  stage detaches those bodies from the model while it runs (our nodes are then opaque nodes of an
  unknown domain to it) and attaches them again after, untouched.
* Its rotary fusion assumes position_ids of the batch's size; :mod:`.rotary_batch` expands the
  [1, T] operands Hugging Face models compute to the batch, so the graph runs at every batch size.
* It runs on an independent copy; a model it cannot handle (it raises) keeps the pipeline's result, and the
  stage reports no change. A stage that fused nothing also leaves the model as it was (the
  optimizer's constant folding and renaming alone are not worth a different graph).
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from attn2onnx.lean_proto import independent_copy

from ._ir_utils import DOMAIN
from .rotary_batch import broadcast_rotary_batch

logger = logging.getLogger(__name__)


def _run_fusions(model: ir.Model) -> dict[str, int]:
    """optimize_for_ort on ``model`` (in place) without our op bodies; the fusions applied, by name."""
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    ours = {key: func for key, func in model.functions.items() if key[0] == DOMAIN}
    for key in ours:
        del model.functions[key]
    try:
        _, counts = optimize_for_ort(model)
        broadcast_rotary_batch(model)
    finally:
        model.functions.update(ours)
    model.opset_imports.setdefault(DOMAIN, 1)
    return {name: n for name, n in counts.items() if n}


class OrtFusionStage(ir.passes.InPlacePass):
    """onnxscript's ORT fusions on what the project's passes left; ``counts``: fusions applied."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        try:
            work = independent_copy(model)
            self.counts = _run_fusions(work)
        except Exception as err:  # noqa: BLE001 - a third-party rewriter: any failure means "not this model"
            logger.debug("onnxscript ORT fusions skipped: %s", err)
            self.counts = {}
        if not self.counts:
            return ir.passes.PassResult(model, False)
        model.graph = work.graph
        model.functions.clear()
        model.functions.update(work.functions)
        return ir.passes.PassResult(model, True)
