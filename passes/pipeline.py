"""The optimize API: compose the graph passes per target and run them on a model or a file.

Targets:

* ``ort``      -- fusions, then attention lowered onto what ONNX Runtime runs fastest
  (com.microsoft MultiHeadAttention where it measured faster, ONNX Attention-23 otherwise);
* ``trt``      -- fusions, attention lowered onto ONNX Attention-23 (TensorRT's parser imports
  it), and the TensorRT plugin annotations of ``passes.trt_plugins``;
* ``portable`` -- fusions and standard-op lowering only (ONNX Attention-23, no vendor domains).

Every target starts and ends with :class:`~attn2onnx.passes.cleanup.CleanupPass`. Our
``ai.attn2onnx`` nodes are never inlined; their function bodies stay attached.

On target ``ort`` onnxscript's ORT fusions (:mod:`.ort_stage`, ``optimize_for_ort``) run after
ours, on what they left: SkipLayerNormalization and BiasGelu in LayerNorm / GELU models, and any
attention our rules miss. Correct on the corpus and our models, and not measurably slower (nor
faster: ORT's session optimiser fuses the norms itself); benchmarks/ort_stage.py, RESULTS.md
"onnxscript ORT fusion stage". Last, not first: where both rule sets want the same attention core,
ours keep the project's contract (fully masked rows uniform, causal mode instead of a bias) and
un-repeat grouped K/V (onnxscript's MultiHeadAttention over repeated K/V ran 0.73x); elsewhere the
order made no difference beyond noise.

Python API::

    model, report = optimize_model(model, target="ort")      # ModelProto or onnx_ir.Model
    report = optimize("in.onnx", "out.onnx", target="ort")  # atomic write, external data past 2 GB
"""

from __future__ import annotations

import os
import onnx
import onnx_ir as ir

from attn2onnx.errors import UsageError
from attn2onnx.lean_proto import structure_proto
from attn2onnx.onnx_io import save_model
from attn2onnx.progress import Progress
from ._ir_utils import to_ir
from .cleanup import CleanupPass
from .fuse_dcmha import FuseDcmhaPass
from .fuse_decode_attention import FuseDecodeAttentionPass
from .fuse_imhsa import FuseImhsaPass
from .fuse_reuse import FuseReusePass
from .fuse_standard_attention import FuseStandardAttentionPass
from .fuse_super_mix import FuseSuperMixPass
from .legalize import LegalizePass
from .lower_attention import LowerAttentionPass
from .normalize_hosseini import NormalizeHosseiniPass
from .ort_stage import OrtFusionStage
from .report import Report, Snapshot
from .trt_plugins import TrtPluginPass

TARGETS = ("ort", "trt", "portable")


class OptimizeError(UsageError):
    """Bad target or unreadable model."""


def build_passes(target: str, native: bool = True) -> list[tuple[str, ir.passes.PassBase]]:
    """(name, pass) in the order ``optimize_model`` runs them for ``target``. ``native`` (target
    ort): plain attention onto ai.attn2onnx::StandardAttention where its table says it is faster
    (:mod:`.native_attention`); off keeps com.microsoft MultiHeadAttention / GroupQueryAttention
    for a stock ONNX Runtime."""
    if target not in TARGETS:
        raise OptimizeError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    passes: list[tuple[str, ir.passes.PassBase]] = [
        ("legalize", LegalizePass()),
        ("cleanup", CleanupPass()),
        ("normalize_hosseini", NormalizeHosseiniPass()),  # per-head loops -> batched cores the fusions below catch
        ("fuse_dcmha", FuseDcmhaPass()),
    ]
    if target == "ort":  # decode graphs' cache attention; before lower_attention, which packs its Q|K|V
        passes.append(("fuse_decode_attention", FuseDecodeAttentionPass()))
    passes += [
        ("fuse_super_mix", FuseSuperMixPass()),
        ("fuse_imhsa", FuseImhsaPass()),
        ("fuse_reuse", FuseReusePass()),
        ("lower_attention", LowerAttentionPass(target=target, native=native)),
        # after lower_attention: only what it left (this project's forms keep their own lowering)
        ("fuse_standard_attention", FuseStandardAttentionPass(target=target, native=native)),
    ]
    if target == "ort":  # last: onnxscript's maintained ORT rules on what ours left (see the module docstring)
        passes.append(("ort_fusions", OrtFusionStage()))
    passes.append(("cleanup", CleanupPass()))
    if target == "trt":
        passes.append(("trt_plugins", TrtPluginPass()))
    return passes


def default_sizes(model: ir.Model) -> dict[str, int]:
    """Concrete sizes for the symbolic dims of the graph inputs, to count MACs: the first axis
    (batch) 1, any other 256."""
    sizes: dict[str, int] = {}
    for value in model.graph.inputs:
        if value.shape is None:
            continue
        for axis, d in enumerate(value.shape.dims):
            if not isinstance(d, int) and d.value is not None:
                sizes.setdefault(str(d.value), 1 if axis == 0 else 256)
    return sizes


def optimize_model(
    model: onnx.ModelProto | ir.Model,
    target: str = "ort",
    sizes: dict[str, int] | None = None,
    progress: Progress | None = None,
    native: bool = True,
) -> tuple[onnx.ModelProto | ir.Model, Report]:
    """Run the ``target`` pipeline. An ``onnx_ir.Model`` is changed in place and returned; a
    ModelProto gives a new ModelProto. ``sizes`` (symbol -> int) sets where MACs are counted;
    ``progress`` shows a bar over the passes (attn2onnx.progress; none by default); ``native``
    as :func:`build_passes`."""
    from attn2onnx.custom_ops import check_model  # imports the op set (torch) only when optimising

    passes = build_passes(target, native)
    was_proto = isinstance(model, onnx.ModelProto)
    irm = to_ir(model)
    # every ai.attn2onnx node against its op's rules (InvalidModelError, a UsageError); the
    # weights are left out of the proto it reads (shape inference would copy each three times)
    check_model(structure_proto(irm))
    sizes = sizes or default_sizes(irm)
    report = Report(target=target, sizes=sizes, before=Snapshot.of(irm, sizes))
    for name, p in (progress or Progress(False)).iterate(passes, "optimize", unit="pass", label=lambda named: named[0]):
        result = p(irm)
        report.add(name, dict(getattr(p, "counts", {})), result.modified)
    report.after = Snapshot.of(irm, sizes)
    return (ir.serde.serialize_model(irm) if was_proto else irm), report


def optimize(
    in_path: str | os.PathLike,
    out_path: str | os.PathLike,
    target: str = "ort",
    sizes: dict[str, int] | None = None,
    progress: Progress | None = None,
    native: bool = True,
) -> Report:
    """Optimize the model at ``in_path`` and write it to ``out_path`` with
    :func:`attn2onnx.onnx_io.save_model` (atomic; weights in ``<out>.data`` past its one
    threshold, or when the input already kept them outside). ``out_path`` may be ``in_path``.

    The file is read once (:func:`attn2onnx.onnx_io.load_ir`: checked, external weights left on
    disk and streamed by the save), so memory stays a small multiple of the model's inline
    bytes: benchmarks/optimize_memory.py, RESULTS.md "Optimize memory"."""
    from attn2onnx.onnx_io import load_ir

    in_path, out_path = os.fspath(in_path), os.fspath(out_path)
    model, report = optimize_model(load_ir(in_path), target, sizes, progress, native)
    save_model(model, out_path)
    return report
