"""Real trained sample models (see samples/README.md): each script trains a small model of an
attn2onnx family on data that ships with Python or scikit-learn, exports it to ONNX and checks
that ONNX Runtime gives the same answers as PyTorch.

    python samples/digits_vit.py --variants mha,dcmha --out out/digits
    python samples/char_lm.py --variant dcmha --out out/char_lm

The scripts run from a checkout (``python samples/...``) and import as ``samples.digits_vit``
and ``samples.char_lm`` (tests/test_samples.py runs their quick modes).
"""

from __future__ import annotations

from pathlib import Path


def ort_session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime session for an exported model, through attn2onnx.runtime (which
    registers the native ai.attn2onnx kernel library when it is built)."""
    from attn2onnx.runtime import session

    return session(str(path), backend="ort", threads=threads)
