"""Text that is not UTF-8: command-line arguments and paths that hold bytes no UTF-8 decoder
takes (Python keeps them as lone surrogates, PEP 383).

ONNX's checker and ONNX Runtime take paths only as UTF-8 ``str``, and a prompt is encoded as
UTF-8, so such text is refused in one line (:func:`check_utf8`) before anything reads or
writes; :func:`printable` shows it, bytes escaped, in any message without a UnicodeEncodeError.
"""

from __future__ import annotations

from .errors import UsageError


def printable(text: str) -> str:
    """``text`` with every byte that is not UTF-8 written as ``\\xNN`` (surrogates that are
    no escaped byte as ``\\udNNN``): safe to print on any stream."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that stands for no byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def check_utf8(text: str, what: str) -> str:
    """``text`` when it encodes as UTF-8, else a UsageError naming ``what`` and showing the bytes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(
            f"{what} '{printable(text)}' is not valid UTF-8; attn2onnx takes UTF-8 text and file names"
        ) from None
    return text


__all__ = ["check_utf8", "printable"]
