"""Shared machinery of the ``ai.attn2onnx`` op set.

Every op folder defines these things and hands them to :func:`register_op` as one :class:`OpDef`:

* an ``onnx.defs.OpSchema`` so that exporters and checkers know the node's signature;
* an onnxscript function body built from standard ONNX ops (opset 23), attached to every
  exported model so that stock runtimes can run the node when no native kernel is registered,
  plus the onnxscript *translation* used by ``torch.onnx.export(custom_translation_table=...)``
  that emits one bare ``ai.attn2onnx`` node (the body is attached after export, never inlined);
* in its ``reference.py``, a ``torch.library.custom_op`` named like the folder, made by
  :func:`define_op` from the op's pure-PyTorch *reference* (the numerical contract of
  variants.md) itself: torch infers the schema from the reference's type hints, so the op's
  signature is written once; plus a fake (shape) function;
* optionally its :class:`Backends` (C++ ORT kernel, Triton kernel, TensorRT plugin), declared in
  the op folder's ``backends.py``. The native build, the TensorRT plugin registration, the trt
  target and ``attn2onnx doctor`` all find an op's backends there, through :data:`REGISTRY`.

This module and the registry import onnx only: loading, checking, optimising and running a graph
need no torch (it takes seconds to import). The torch side of an op (its ``reference.py`` and
Triton kernel) is imported on first use, by :meth:`OpDef.load_torch`; the functions below that
build it import torch themselves.

Training through the ops works because :func:`register_autograd_from_reference` gives each op
a backward that differentiates its reference implementation.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Collection, Mapping, Sequence

import onnx
import onnx.defs

if TYPE_CHECKING:  # pragma: no cover  (annotations only: torch is imported where the torch side is built)
    import torch

DOMAIN = "ai.attn2onnx"
OPSET_VERSION = 1
TORCH_NAMESPACE = "attn2onnx"
# Standard ONNX opset that the function bodies are written against.
BODY_OPSET = 23

FLOAT_TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


@dataclass(frozen=True)
class AttrRule:
    """What one attribute accepts beyond its schema type (checked by :mod:`._validation` before
    a model is optimised or run). Bounds apply to every entry of a list attribute."""

    name: str
    required: bool = True
    min: float | None = None  # inclusive lower bound
    above: float | None = None  # exclusive lower bound
    max: float | None = None  # inclusive upper bound (a sanity cap: sizes the bodies allocate)
    choices: tuple[int, ...] | None = None
    length: str | None = None  # a list attribute has one entry per unit of this input dim label


@dataclass(frozen=True)
class Rule:
    """A condition across attributes and input dims: ``holds(**values)`` gets the attributes and
    dim labels named in ``uses`` and is only asked when all of them are known."""

    expected: str
    uses: tuple[str, ...]
    holds: Callable[..., bool]


@dataclass(frozen=True)
class OpRules:
    """One op's contract for the validator: attribute rules, and per input its dims as labels
    ("B T N d": one letter group per axis; equal labels are equal sizes, digits are literal sizes,
    "T|1" is T or 1), or a tuple of such forms of different ranks where the input takes several."""

    attributes: tuple[AttrRule, ...]
    inputs: Mapping[str, str | tuple[str, ...]]
    rules: tuple[Rule, ...] = ()

    def forms(self, name: str) -> tuple[str, ...]:
        """The dim forms input ``name`` accepts, one per rank (none when it declares no dims)."""
        spec = self.inputs.get(name, ())
        return (spec,) if isinstance(spec, str) else tuple(spec)

    @property
    def required(self) -> list[str]:
        """Names of the attributes every node must carry."""
        return [a.name for a in self.attributes if a.required]


# The boolean-like int attributes (bool in the torch op, 0 or 1 on the node).
FLAG = (0, 1)


@dataclass(frozen=True)
class Backends:
    """Where an op runs besides its standard-op function body; every entry is optional.

    An op folder declares them in its ``backends.py``: plain constants (``KERNEL_SOURCE``,
    ``TRITON_MODULE``, ``TRT_PLUGIN_MODULE``) and no imports, because the native build
    (:func:`attn2onnx.runtime.native.kernel_sources`) reads that file by path: importing the op
    set loads onnx and onnxscript, which ``python -m attn2onnx.runtime.native`` does not need."""

    kernel_source: Path | None = None  # C++ ONNX Runtime CPU kernel, compiled into the native library
    triton_module: str | None = None  # imported where triton is: registers the torch op's CUDA kernel
    trt_plugin_module: str | None = None  # TensorRT plugin: ONNX_OP, PLUGIN_NAMESPACE, register()

    @classmethod
    def declared(cls, package: str) -> Backends:
        """The backends that the op package ``package`` declares in its ``backends.py``."""
        declaration = importlib.import_module(f"{package}.backends")
        kernel = getattr(declaration, "KERNEL_SOURCE", None)
        triton = getattr(declaration, "TRITON_MODULE", None)
        plugin = getattr(declaration, "TRT_PLUGIN_MODULE", None)
        return cls(
            kernel_source=Path(declaration.__file__).parent / kernel if kernel else None,
            triton_module=f"{package}.{triton}" if triton else None,
            trt_plugin_module=f"{package}.{plugin}" if plugin else None,
        )

    def names(self) -> list[str]:
        """The kinds of backend declared: "native", "triton", "tensorrt"."""
        kinds = {"native": self.kernel_source, "triton": self.triton_module, "tensorrt": self.trt_plugin_module}
        return [kind for kind, where in kinds.items() if where is not None]


@dataclass(frozen=True)
class Overload:
    """A second standard-op body of an op (an ONNX IR >= 10 function overload) for the nodes that
    pass ``inputs`` inputs: a function body cannot read an optional input its caller leaves out
    (ORT inlines it as "" and rejects the graph), so such an input gets a body of its own."""

    name: str  # the FunctionProto's and the calling node's ``overload``
    inputs: int  # nodes passing this many inputs (trailing empty names not counted) use this body
    body: Callable[[], onnx.FunctionProto]


@dataclass(frozen=True)
class OpDef:
    """Everything the exporter and the runtimes need to know about one op. ``package`` is the op
    folder's module name; its torch op (``torch.ops.attn2onnx.<folder name>``) is not held here
    but imported on first use (:meth:`load_torch`), so the registry needs no torch."""

    onnx_name: str
    package: str  # "attn2onnx.custom_ops.super_mix": reference.py there defines torch op "super_mix"
    schema: onnx.defs.OpSchema
    translation: Any  # onnxscript OnnxFunction emitting the bare custom node
    body: Any  # onnxscript OnnxFunction made of standard ops
    rules: OpRules | None = field(default=None, compare=False)
    backends: Backends = field(default_factory=Backends, compare=False)
    overloads: tuple[Overload, ...] = field(default=(), compare=False)

    @property
    def torch_name(self) -> str:
        """The torch op's name in the ``attn2onnx`` namespace: the folder's name."""
        return self.package.rpartition(".")[2]

    def load_torch(self) -> ModuleType:
        """The op's ``reference.py`` module, imported on first call (with torch): importing it
        registers ``torch.ops.attn2onnx.<torch_name>``; where triton is installed, the op's Triton
        kernel is imported after it, which registers the torch op's CUDA kernel."""
        module = importlib.import_module(f"{self.package}.reference")
        if self.backends.triton_module and importlib.util.find_spec("triton") is not None:
            importlib.import_module(self.backends.triton_module)
        return module

    @property
    def torch_op(self) -> Any:
        """The torch custom op (``torch._library.custom_ops.CustomOpDef``), loaded by :meth:`load_torch`."""
        return getattr(self.load_torch(), self.torch_name)

    @property
    def overload_packet(self) -> Any:
        """The ``torch.ops.attn2onnx.<name>`` overload the exporter sees in the graph."""
        import torch

        namespace, name = self.torch_op._qualname.split("::")
        return getattr(getattr(torch.ops, namespace), name).default

    def function_proto(self) -> onnx.FunctionProto:
        """The op's standard-op body as an ONNX local function of the custom domain."""
        proto = self.body.to_function_proto()
        proto.domain = DOMAIN
        proto.name = self.onnx_name
        return proto

    def overload_for(self, inputs: Sequence[str]) -> Overload | None:
        """The overload a node with these input names calls (None: the plain body)."""
        given = len(inputs)
        while given and not inputs[given - 1]:
            given -= 1
        return next((o for o in self.overloads if o.inputs == given), None)


REGISTRY: dict[str, OpDef] = {}
# torch op qualname ("attn2onnx::super_mix") -> its pure-PyTorch reference implementation.
REFERENCES: dict[str, Callable[..., Any]] = {}


# Set by the trt pass on nodes that a TensorRT plugin runs (architecture.md): part of every
# schema so tagged models still pass onnx.checker.
TRT_ATTRIBUTES = (
    ("plugin_namespace", onnx.defs.OpSchema.AttrType.STRING, "TensorRT plugin namespace (set by the trt pass)"),
    ("aot", onnx.defs.OpSchema.AttrType.INT, "1: use the plugin's ahead-of-time (PTX) implementation"),
)
TRT_RULES = (AttrRule("plugin_namespace", required=False), AttrRule("aot", required=False, choices=FLAG))


def make_schema(
    name: str,
    doc: str,
    inputs: Sequence[tuple[str, str, str]],
    outputs: Sequence[tuple[str, str]],
    attributes: Sequence[tuple[str, onnx.defs.OpSchema.AttrType, str]] = (),
    type_constraints: Sequence[tuple[str, list[str], str]] = (("T", FLOAT_TYPES, "float tensors"),),
    required: Collection[str] = (),
) -> onnx.defs.OpSchema:
    """Build an OpSchema. ``inputs`` are (name, type_str, option) with option one of
    "" (single) or "optional"; ``outputs`` are (name, type_str); ``required`` names the
    attributes a node must carry (``OpRules.required``, so onnx.checker agrees with the validator)."""
    param = onnx.defs.OpSchema.FormalParameter
    option = {
        "": onnx.defs.OpSchema.FormalParameterOption.Single,
        "optional": onnx.defs.OpSchema.FormalParameterOption.Optional,
    }
    return onnx.defs.OpSchema(
        name,
        DOMAIN,
        OPSET_VERSION,
        doc=doc,
        inputs=[param(n, t, param_option=option[o]) for n, t, o in inputs],
        outputs=[param(n, t) for n, t in outputs],
        type_constraints=list(type_constraints),
        attributes=[
            onnx.defs.OpSchema.Attribute(n, kind, d, required=n in required)
            for n, kind, d in [*attributes, *TRT_ATTRIBUTES]
        ],
    )


def register_op(opdef: OpDef) -> OpDef:
    """Register the schema with onnx (once per process) and the op in :data:`REGISTRY`. The torch
    side is left for :meth:`OpDef.load_torch`."""
    if not onnx.defs.has(opdef.onnx_name, DOMAIN):
        onnx.defs.register_schema(opdef.schema)
    REGISTRY[opdef.onnx_name] = opdef
    return opdef


def torch_attributes(opdef: OpDef) -> Callable[[str], Any]:
    """The module ``__getattr__`` (PEP 562) of an op folder: its torch op and reference
    (``<torch_name>``, ``<torch_name>_reference``) are read from its ``reference.py``, imported
    on first use, so that importing the folder (schema, body, rules) needs no torch."""
    names = (opdef.torch_name, f"{opdef.torch_name}_reference")

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {opdef.package!r} has no attribute {name!r}")
        return getattr(opdef.load_torch(), name)

    return __getattr__


def check_attention_inputs(
    op_name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor
) -> None:
    """ValueError unless q is [B,T,N,d], k and v are [B,S,N,d] and key_padding_mask is [B,S]."""
    if q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(
            f"{op_name}: expected q [B,T,N,d] and k, v [B,S,N,d], got {list(q.shape)}, {list(k.shape)}, {list(v.shape)}"
        )
    if key_padding_mask.shape != k.shape[:2]:
        raise ValueError(
            f"{op_name}: key_padding_mask must be [B,S] = {list(k.shape[:2])}, got {list(key_padding_mask.shape)}"
        )


def empty_like_first(x: torch.Tensor, *_: object) -> torch.Tensor:
    """Fake function of an op whose one output is shaped like its first input."""
    import torch

    return torch.empty_like(x)


def define_op(name: str, reference: Callable[..., Any], fake: Callable[..., Any]) -> Any:
    """The torch op ``attn2onnx::<name>`` whose eager body is ``reference`` itself: torch infers
    the op's schema from the reference's type hints, so its signature is written once. ``fake``
    gives the output shapes (it may take ``*args``); the backward differentiates the reference
    (:func:`register_autograd_from_reference`). The reference must return fresh tensors laid out
    as ``fake`` says (contiguous), since it is what the op returns."""
    import torch

    torch_op = torch.library.custom_op(f"{TORCH_NAMESPACE}::{name}", reference, mutates_args=())
    torch_op.register_fake(fake)
    register_autograd_from_reference(torch_op, reference)
    return torch_op


def register_autograd_from_reference(torch_op: Any, reference: Callable[..., Any]) -> None:
    """Give ``torch_op`` a backward pass by differentiating ``reference`` (same signature).

    The reference is re-run under autograd in backward (recompute instead of storing
    intermediates), so the custom ops train exactly like the plain-PyTorch math they stand for.
    It is also recorded in :data:`REFERENCES`, where the stock-export path finds it to
    decompose the op into plain aten ops.
    """
    import torch

    REFERENCES[torch_op._qualname] = reference

    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        ctx.inputs = inputs

    def backward(ctx: Any, *grad_outputs: torch.Tensor) -> tuple:
        inputs = ctx.inputs
        with torch.enable_grad():
            leaves = [
                t.detach().requires_grad_(True) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                for t in inputs
            ]
            outputs = reference(*leaves)
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            wanted = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor) and t.requires_grad]
            pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None and o.requires_grad]
            grads = (
                torch.autograd.grad(
                    [o for o, _ in pairs], [leaves[i] for i in wanted], [g for _, g in pairs], allow_unused=True
                )
                if pairs
                else [None] * len(wanted)
            )
        result: list[Any] = [None] * len(inputs)
        for i, g in zip(wanted, grads):
            result[i] = g
        return tuple(result)

    torch_op.register_autograd(backward, setup_context=setup_context)


# NEG of variants.md: masked logits are replaced (never biased) by this finite negative.
# Softmax always runs in fp32 or wider, where -1e30 is representable; a fully masked row
# then gives a uniform distribution instead of NaN.
NEG = -1e30
