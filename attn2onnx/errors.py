"""Errors a user can cause and fix: the CLI prints them as one line (``attn2onnx: error: ...``)
and exits 2, never with a traceback.

``VariantError`` (attn2onnx.variants) is the variant-level sibling of these; both are
``ValueError`` subclasses. Anything else escaping a command is a bug and keeps its traceback.
"""

from __future__ import annotations


class UsageError(ValueError):
    """Something asked of attn2onnx that it cannot do as asked: a bad option, a wrong input
    shape, a model config that does not fit together."""


class CheckpointError(UsageError):
    """A file that is not a loadable attn2onnx checkpoint (corrupt, foreign, wrong version)."""


__all__ = ["UsageError", "CheckpointError"]
