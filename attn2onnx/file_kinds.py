"""Which kind of model file a path holds -- a PyTorch file or an ONNX model -- told from its
first bytes and its name, without importing torch or onnx. A command given the other kind of
file than it takes says what to do with it ("export it first", "already an ONNX model") instead
of "not a readable ONNX model" or "not a PyTorch file"; these checks only word such errors and
never make a file acceptable.

* A PyTorch file is a zip archive as ``torch.save`` and ``torch.export.save`` write it (an entry
  ``data.pkl``, ``version`` or ``archive_format`` under its root folder; an ``.npz`` is a zip of
  ``.npy`` entries and is not one), or a pickle (a legacy ``torch.save``, ``pickle.dump``).
* An ONNX model is a serialised ``ModelProto``: ONNX writes its fields in number order, so the
  file starts with field 1 (``ir_version``, a small varint) followed by another ModelProto field.
"""

from __future__ import annotations

import os
import shlex
import zipfile
from pathlib import Path

from .errors import UsageError

ZIP_MAGIC = b"PK\x03\x04"
# Pickle protocols 2..5 start with PROTO (0x80) and the protocol number.
PICKLE_PROTOCOLS = (2, 3, 4, 5)
_TORCH_ENTRIES = ("data.pkl", "version", "archive_format")
# ModelProto's first bytes: tag of field 1 (ir_version, varint), a version below 128, then the tag
# of the next field ONNX writes (2-8 and 14 in one byte; 20, 25 and 26 take two: 0xa2 / 0xca / 0xd2, 0x01).
_IR_VERSION_TAG = 0x08
_NEXT_TAGS = frozenset((0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x72, 0xA2, 0xCA, 0xD2))


def _head(path: str | os.PathLike, size: int = 4) -> bytes:
    """The first ``size`` bytes of the regular file ``path`` (b"" for anything else: a FIFO or a
    device is never opened, it could block)."""
    try:
        if not Path(path).is_file():
            return b""
        with open(path, "rb") as f:
            return f.read(size)
    except OSError:
        return b""


def is_pickle(path: str | os.PathLike) -> bool:
    """Whether ``path`` starts as a pickle of protocol 2 or later does (a legacy ``torch.save``)."""
    head = _head(path, 2)
    return len(head) == 2 and head[0] == 0x80 and head[1] in PICKLE_PROTOCOLS


def is_torch_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a PyTorch file: a torch zip archive or a pickle (module docstring)."""
    if is_pickle(path):
        return True
    if not _head(path).startswith(ZIP_MAGIC):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return False
    return any(name.rsplit("/", 1)[-1] in _TORCH_ENTRIES for name in names)


def is_onnx_model(path: str | os.PathLike) -> bool:
    """Whether ``path`` starts as ONNX writes a model (module docstring)."""
    head = _head(path, 3)
    return len(head) == 3 and head[0] == _IR_VERSION_TAG and 0 < head[1] < 0x80 and head[2] in _NEXT_TAGS


def quoted(path: str | os.PathLike) -> str:
    """``path`` as a shell word, for the commands an error suggests."""
    return shlex.quote(os.fspath(path))


def onnx_name(path: str | os.PathLike) -> str:
    """The ONNX file to suggest exporting ``path`` to: its name with ``.onnx`` for its suffix."""
    path = Path(path)
    suggested = path.with_suffix(".onnx") if path.suffix else path.with_name(path.name + ".onnx")
    return str(suggested if suggested != path else path.with_suffix(".exported.onnx"))


def torch_file_error(path: str | os.PathLike, flags: str = "") -> UsageError:
    """The error for a PyTorch file given where an ONNX model goes: export it first (with
    ``flags``, e.g. ``--decode`` where a decode graph goes)."""
    return UsageError(
        f"{path} is a PyTorch file, not an ONNX model: export it first "
        f"(attn2onnx export {quoted(path)} -o {quoted(onnx_name(path))}{' ' + flags if flags else ''})"
    )


def onnx_model_error(path: str | os.PathLike) -> UsageError:
    """The error for an ONNX model given where a PyTorch model goes: it needs no export."""
    optimized = Path(path).with_suffix(".opt.onnx")
    return UsageError(
        f"{path} is already an ONNX model: optimize it (attn2onnx optimize {quoted(path)} -o "
        f"{quoted(optimized)}) or run it (attn2onnx run {quoted(path)})"
    )


def require_onnx_name(path: str | os.PathLike) -> None:
    """Refuse an output named other than ``*.onnx`` for an ONNX model (export and optimize alike)."""
    if not os.fspath(path).endswith(".onnx"):
        raise UsageError(f"output {os.fspath(path)!r} should end in .onnx")


__all__ = [
    "is_onnx_model",
    "is_pickle",
    "is_torch_file",
    "onnx_model_error",
    "onnx_name",
    "quoted",
    "require_onnx_name",
    "torch_file_error",
]
