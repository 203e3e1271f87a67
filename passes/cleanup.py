"""Cleanup: constant folding, CSE, identity / dead-node removal and shape inference.

Built on ``onnxscript.optimizer.optimize_ir`` (public API) with ``inline=False``: the ``ai.attn2onnx`` nodes stay single
nodes with their function bodies attached (a runtime with a native kernel runs the kernel, the
others run the body), and constant folding never evaluates one of our nodes.
"""

from __future__ import annotations

import logging

import onnx_ir as ir
import onnxscript.optimizer

from ._ir_utils import DOMAIN, type_function_inputs

logger = logging.getLogger(__name__)


def _fold(node: ir.Node) -> bool | None:
    """Never fold an ai.attn2onnx node (its value depends on which runtime runs it: keep it)."""
    return False if node.domain == DOMAIN else None


class CleanupPass(ir.passes.InPlacePass):
    """onnxscript's optimizer (folding, default rewrite rules such as Transpose∘Transpose and
    no-op removal, dead code, CSE) without inlining, then identity elimination."""

    def __init__(self, num_iterations: int = 2, shape_inference: bool = True) -> None:
        super().__init__()
        self.num_iterations = num_iterations
        self.shape_inference = shape_inference

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = _fingerprint(model)
        # Our function bodies are the ops' contract: the optimizer must not rewrite them (it
        # would, e.g., turn an If branch's Identity into a bare outer-scope output).
        ours = {key: f for key, f in model.functions.items() if key[0] == DOMAIN}
        for key in ours:
            del model.functions[key]
        type_function_inputs(model)  # so shape inference sees inside the model's own functions
        onnxscript.optimizer.optimize_ir(
            model,
            num_iterations=self.num_iterations,
            onnx_shape_inference=self.shape_inference,
            should_fold=_fold,
            inline=False,
        )
        ir.passes.common.IdentityEliminationPass()(model)
        ir.passes.common.RemoveUnusedNodesPass()(model)
        model.functions.update(ours)
        ir.passes.common.RemoveUnusedFunctionsPass()(model)
        _import_function_domains(model)
        changed = _fingerprint(model) != before
        logger.debug("cleanup: %d nodes, %s", len(model.graph), "changed" if changed else "no change")
        return ir.passes.PassResult(model, changed)


def _import_function_domains(model: ir.Model) -> None:
    """The model imports every domain its functions import: ONNX Runtime checks an inlined
    function's nodes against the model's imports, and the optimizer dropped those that only a
    function uses (our op bodies were out of its sight, the model's own functions it ignores)."""
    for function in model.functions.values():
        for domain, version in function.opset_imports.items():
            model.opset_imports.setdefault(domain, version)


def _fingerprint(model: ir.Model) -> tuple:
    """What cleanup may change: each node's op and inputs, and the number of initializers."""
    nodes = tuple((n.domain, n.op_type, tuple(id(v) for v in n.inputs)) for n in model.graph)
    return nodes, len(model.graph.initializers)


def cleanup(model: ir.Model) -> ir.Model:
    """Run :class:`CleanupPass` in place and return the model."""
    CleanupPass()(model)
    return model


__all__ = ["CleanupPass", "cleanup"]
