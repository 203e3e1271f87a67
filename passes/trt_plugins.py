"""TensorRT target: annotate ``ai.attn2onnx`` nodes for TensorRT's ONNX parser.

TensorRT's parser imports a custom node as a plugin only when the node carries a string
attribute ``plugin_namespace`` naming a registered plugin's namespace; otherwise it imports the
node's local function body (standard ops). This pass adds ``plugin_namespace`` to every
``ai.attn2onnx`` node whose op declares a TensorRT plugin (``OpDef.backends`` in the op registry), in the
main graph, its subgraphs and the model's local functions, and leaves every other node alone.

It also refuses a model that TensorRT would silently mis-import: the parser's built-in
importers win by op *name* whatever the domain, so a non-standard-domain node or function
named ``Attention``, ``RMSNormalization``, ``RotaryEmbedding`` or ``TRT_*`` would run as
TensorRT's built-in op instead of ours (:class:`TrtNameClash`).
"""

from __future__ import annotations

from typing import Mapping

import onnx_ir as ir

from ._ir_utils import DOMAIN

# Op names TensorRT's ONNX parser maps onto its own built-in layers regardless of domain.
TRT_BUILTIN_NAMES = frozenset({"Attention", "RMSNormalization", "RotaryEmbedding"})
TRT_RESERVED_PREFIX = "TRT_"
STANDARD_DOMAINS = frozenset({"", "ai.onnx"})


class TrtNameClash(ValueError):
    """A custom node or function is named like a TensorRT built-in importer."""


def clashes_with_builtin(op_type: str) -> bool:
    return op_type in TRT_BUILTIN_NAMES or op_type.startswith(TRT_RESERVED_PREFIX)


def default_plugin_ops() -> dict[str, str]:
    """ONNX op type -> plugin namespace for every op of the registry that declares a TensorRT plugin."""
    from attn2onnx.runtime.tensorrt import plugin_ops

    return plugin_ops()


class TrtPluginPass(ir.passes.InPlacePass):
    """Tag plugin-backed ``ai.attn2onnx`` nodes with ``plugin_namespace`` (and ``aot`` = 1
    when ``aot``), after checking no custom node is named like a TensorRT built-in.

    ``counts`` after a run: ``tagged`` (nodes given the attribute), ``function_body`` (our nodes
    with no plugin, which TensorRT imports as their function body).
    """

    def __init__(self, plugin_ops: Mapping[str, str] | None = None, *, aot: bool = False):
        super().__init__()
        self._plugin_ops = dict(plugin_ops) if plugin_ops is not None else None
        self.aot = aot
        self.counts: dict[str, int] = {}

    @property
    def plugin_ops(self) -> dict[str, str]:
        if self._plugin_ops is None:
            self._plugin_ops = default_plugin_ops()
        return self._plugin_ops

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.check_names(model)
        counts = {"tagged": 0, "function_body": 0}
        modified = False
        for node in self._all_nodes(model):
            if node.domain != DOMAIN:
                continue
            namespace = self.plugin_ops.get(node.op_type)
            if namespace is None or _calls_overload(node):
                counts["function_body"] += 1
                continue
            current = node.attributes.get("plugin_namespace")
            if current is None or current.value != namespace:
                node.attributes["plugin_namespace"] = ir.AttrString("plugin_namespace", namespace)
                modified = True
            if self.aot and node.attributes.get("aot") is None:
                node.attributes["aot"] = ir.AttrInt64("aot", 1)
                modified = True
            counts["tagged"] += 1
        self.counts = counts
        return ir.passes.PassResult(model, modified)

    @staticmethod
    def _all_nodes(model: ir.Model):
        yield from ir.traversal.RecursiveGraphIterator(model.graph)
        for function in model.functions.values():
            yield from ir.traversal.RecursiveGraphIterator(function)

    def check_names(self, model: ir.Model) -> None:
        """Raise :class:`TrtNameClash` for a custom-domain node or function named like a built-in."""
        clashes = set()
        for node in self._all_nodes(model):
            if node.domain not in STANDARD_DOMAINS and clashes_with_builtin(node.op_type):
                clashes.add(f"node {node.domain}::{node.op_type}")
        for function in model.functions.values():
            if function.domain not in STANDARD_DOMAINS and clashes_with_builtin(function.name):
                clashes.add(f"function {function.domain}::{function.name}")
        if clashes:
            raise TrtNameClash(
                f"{', '.join(sorted(clashes))}: TensorRT's parser would import these as its built-in "
                f"{'/'.join(sorted(TRT_BUILTIN_NAMES))}/{TRT_RESERVED_PREFIX}* layers; rename the op"
            )


def _calls_overload(node: ir.Node) -> bool:
    """The node passes an optional input (DcmhaAttention's attn_mask): it runs its op's overload
    body, which no plugin implements."""
    from attn2onnx.custom_ops import REGISTRY

    opdef = REGISTRY.get(node.op_type)
    return opdef is not None and opdef.overload_for([v.name if v is not None else "" for v in node.inputs]) is not None


def tag_trt_plugins(model, plugin_ops: Mapping[str, str] | None = None, *, aot: bool = False):
    """Run :class:`TrtPluginPass` on a ModelProto (returns a new one) or an onnx_ir Model (in place)."""
    from ._ir_utils import to_ir, to_proto

    import onnx

    was_proto = isinstance(model, onnx.ModelProto)
    irm = to_ir(model)
    TrtPluginPass(plugin_ops, aot=aot)(irm)
    return to_proto(irm) if was_proto else irm


__all__ = ["TRT_BUILTIN_NAMES", "TrtNameClash", "TrtPluginPass", "clashes_with_builtin", "tag_trt_plugins"]
