"""One module per ``attn2onnx`` subcommand (see attn2onnx.cli for the interface), and the
argument checks they share: argparse types for sizes and counts (a bad value is a one-line
usage error before any work) and the memory check for random inputs."""

from __future__ import annotations

import argparse
import math
import os
from typing import Iterable, Sequence


def _number(text: str, kind: type) -> int | float:
    """``text`` as ``kind`` (int or float), or argparse's usual 'invalid ... value' error."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type for sizes and counts (batch, sequence length, threads, layers, ...): >= 1."""
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type for seeds and other values that may be 0 but not negative."""
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {value}")
    return value


# Seeds feed torch.manual_seed, which takes at most 2**64 - 1 (numpy takes any size).
MAX_SEED = 2**64 - 1


def seed_int(text: str) -> int:
    """argparse type for seeds: 0 .. MAX_SEED."""
    value = non_negative_int(text)
    if value > MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be at most 2**64 - 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type for amounts such as a workspace size in GiB: finite and > 0."""
    value = _number(text, float)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type for amounts that may be 0, such as a sampling temperature: finite and >= 0."""
    value = _number(text, float)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def machine_memory() -> int | None:
    """Bytes of physical memory on this machine (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_input_memory(specs: Sequence, shapes: Iterable[tuple[int, int]]) -> None:
    """Refuse (UsageError) random inputs of ``specs`` (io_spec.InputSpec rows) at any (batch,
    seq) of ``shapes`` that would not fit in this machine's memory, before numpy tries to
    allocate them (a MemoryError, swapping or the OOM killer otherwise)."""
    from ..errors import UsageError

    memory = machine_memory()
    if memory is None:
        return
    for batch, seq in shapes:
        need = sum(math.prod(spec.shape(batch, seq)) * spec.numpy_dtype.itemsize for spec in specs)
        if need > memory:
            raise UsageError(
                f"inputs of batch {batch} x seq {seq} take {need / 2**30:,.1f} GiB, "
                f"more than this machine's {memory / 2**30:,.1f} GiB of memory"
            )
