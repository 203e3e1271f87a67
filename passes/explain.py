"""``optimize --explain``: every attention-shaped subgraph and what the pipeline made of it.

An attention core is a Softmax whose input reaches a q·k product (MatMul / Einsum) through
scales, casts and masks, or an ONNX Attention node. After the pipeline a core is *fused* when its
node is gone; otherwise the reason is the first failed check of the standard-attention rules
(:mod:`.fuse_standard_attention`; :mod:`.fuse_imhsa`'s for a softmax of an iMHSA core) run on it
in the optimised graph: node, expected, found. An ONNX Attention node is already the fused form
for targets trt and portable. A core that already is a fused attention op -- an ``ai.attn2onnx``
one (DcmhaAttention, PooledNormAttention, ...) or ONNX Runtime's contrib attention of a graph
optimised before -- counts as fused, naming the op and whether the pipeline kept or lowered it.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
import onnx_ir as ir

from attn2onnx.lean_proto import independent_copy

from ._ir_utils import DOMAIN, Scope, scopes, to_ir
from ._match import NoMatch, describe
from .lower_attention import MS_DOMAIN
from .normalize_hosseini import merged_cores

_THROUGH = ("Cast", "Where", "Add", "Mul", "Div", "Sub", "Squeeze", "Unsqueeze", "Reshape", "Tanh")
# Ops that are a whole attention core already: this project's custom ops and ORT's contrib ones.
_FUSED_OPS = frozenset(
    [
        (DOMAIN, op)
        for op in ("DcmhaAttention", "PooledNormAttention", "ProbAttention", "LandmarkAttention", "StandardAttention")
    ]
    + [(MS_DOMAIN, op) for op in ("MultiHeadAttention", "GroupQueryAttention", "Attention")]
)


@dataclass(frozen=True)
class Outcome:
    """One core: its node, whether it fused, and otherwise why not. ``op`` names the fused op a
    core already was (``domain::op_type``); its ``reason`` then says so and what the pipeline did."""

    core: str
    fused: bool
    reason: str = ""
    op: str = ""

    def __str__(self) -> str:
        if not self.fused:
            return f"{self.core}: not fused: {self.reason}"
        return f"{self.core}: fused ({self.reason})" if self.reason else f"{self.core}: fused"


def _reaches_product(value: ir.Value, depth: int = 24) -> bool:
    """Whether ``value`` is a q·k product seen through up to ``depth`` elementwise / mask nodes."""
    for _ in range(depth):
        node = value.producer()
        if node is None or node.domain != "":
            return False
        if node.op_type in ("MatMul", "Einsum"):
            return True
        if node.op_type not in _THROUGH:
            return False
        inputs = [x for x in node.inputs if x is not None and x.producer() is not None]
        if node.op_type == "Where":
            inputs = [x for x in node.inputs[1:] if x is not None and x.producer() is not None]
        if not inputs:
            return False
        value = max(inputs, key=lambda x: len(x.shape or ()))
    return False


def attention_cores(graph: ir.Graph) -> list[ir.Node]:
    """The attention-shaped nodes of ``graph`` (Softmax over q·k logits, ONNX Attention, and the
    ops of :data:`_FUSED_OPS`)."""
    return [
        n
        for n in graph
        if (n.domain, n.op_type) in _FUSED_OPS
        or (n.domain == "" and (n.op_type == "Attention" or (n.op_type == "Softmax" and _reaches_product(n.inputs[0]))))
    ]


def _already_fused(node: ir.Node, left: ir.Node | None, target: str) -> Outcome:
    """The outcome of a core that was a fused op before the pipeline: kept (``left``, its node in
    the optimised graph, is the same op) or lowered for ``target``."""
    op = f"{node.domain}::{node.op_type}"
    kept = left is not None and (left.domain, left.op_type) == (node.domain, node.op_type)
    return Outcome(describe(node), True, f"already {op}, {'kept' if kept else f'lowered for target {target}'}", op)


def _match_any(core: ir.Node, target: str) -> None:
    """Run the rules that claim ``core`` (iMHSA when its softmax feeds A_Q @ (A_K @ v), the
    standard-attention rules otherwise); NoMatch says the first failed check."""
    from .fuse_imhsa import core_end, match_landmark
    from .fuse_standard_attention import match

    end = core_end(core) if core.op_type == "Softmax" else None
    if end is not None:
        match_landmark(end)
    else:
        match(core, target)


def _key(scope: Scope, name: str) -> tuple:
    """A node's key in every copy of the model: its name within the main graph or within the
    function whose scope (subgraphs included) holds it."""
    return scope.main, scope.top.name, name


def explain(model: onnx.ModelProto | ir.Model, target: str = "ort", native: bool = True) -> list[Outcome]:
    """Run the ``target`` pipeline (``native`` as pipeline.build_passes) on a copy of ``model`` and
    say, per attention core, whether it fused and, where not, why."""
    from .pipeline import optimize_model

    before = to_ir(model)
    after, _ = optimize_model(independent_copy(before), target=target, native=native)  # no weight copied
    # a batched core (normalize_hosseini) stands for the per-head cores it replaced
    remaining = {_key(s, name): n for s in scopes(after) for n in s.graph for name in (n.name, *merged_cores(n))}
    outcomes = []
    for scope, node in ((s, n) for s in scopes(before) for n in attention_cores(s.graph)):
        left = remaining.get(_key(scope, node.name))
        if (node.domain, node.op_type) in _FUSED_OPS:
            outcomes.append(_already_fused(node, left, target))
            continue
        if left is None or left.op_type != node.op_type or (left.op_type == "Attention" and target != "ort"):
            outcomes.append(Outcome(describe(node), True))
            continue
        try:
            _match_any(left, target)
        except NoMatch as why:
            outcomes.append(Outcome(describe(node), False, str(why)))
        else:  # pragma: no cover - the pipeline fuses every core the rules accept
            outcomes.append(Outcome(describe(node), False, "the rules accept it, but no pass fused it"))
    return outcomes


__all__ = ["Outcome", "attention_cores", "explain"]
