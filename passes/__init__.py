"""ONNX graph passes (installed as ``attn2onnx.passes``).

``optimize_model(model, target)`` and ``optimize(in_path, out_path, target)`` run the per-target
pipeline (:mod:`.pipeline`); the passes themselves live in :mod:`.cleanup`, :mod:`.fuse_dcmha`,
:mod:`.fuse_super_mix`, :mod:`.fuse_imhsa`, :mod:`.fuse_reuse` and
:mod:`.lower_attention`, and :mod:`.report` says what they did.
"""

from .pipeline import TARGETS, OptimizeError, build_passes, optimize, optimize_model

__all__ = ["TARGETS", "OptimizeError", "build_passes", "optimize", "optimize_model"]
