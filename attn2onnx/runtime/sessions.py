"""ONNX Runtime sessions for attn2onnx models.

A model exported by attn2onnx holds ``ai.attn2onnx`` nodes with their standard-op function
bodies attached. With the native kernel library registered (:mod:`.native`), ORT runs each such
node with its fused C++ kernel (a registered kernel wins over the function body); without it,
ORT inlines the bodies and the model still runs, only slower and with more memory.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterator

from ..errors import UsageError


# Machines with fewer CPUs still take this many threads: a few threads more than CPUs cost
# little and let thread-split checks (bit-identical results at 1, 2, 3 threads) run anywhere.
MIN_THREAD_LIMIT = 16


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask; the CPU count where the OS has none)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def thread_limit() -> int:
    """The most intra-op threads a session takes: :func:`usable_cpus` (a thread beyond those
    only waits for one, and ORT's idle threads spin), or MIN_THREAD_LIMIT where that is more.
    One bound for every command's ``--threads`` and for :func:`session`, so a typo such as
    3000 or 2**32 is an error instead of thousands of spinning threads."""
    return max(usable_cpus(), MIN_THREAD_LIMIT)


def check_threads(threads: int) -> int:
    """``threads`` when it is an int in 1 .. :func:`thread_limit`, else a one-line UsageError."""
    if isinstance(threads, bool) or not isinstance(threads, int):
        raise UsageError(f"threads must be an integer, got {threads!r}")
    limit = thread_limit()
    if not 1 <= threads <= limit:
        raise UsageError(f"threads must be 1 .. {limit}, got {threads} (this process may run on {usable_cpus()} CPUs)")
    return threads


def session_options(*, native_kernels: bool = True, threads: int | None = None) -> Any:
    """``onnxruntime.SessionOptions`` with the kernel library registered when it is available;
    ``threads`` (1 .. :func:`thread_limit`) sets the intra-op thread count."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT's graph-optimiser warnings are not the user's to act on
    if threads is not None:
        options.intra_op_num_threads = check_threads(threads)
    if native_kernels:
        from . import native  # imported here: `python -m attn2onnx.runtime.native` stays clean

        reason = native.unavailable_reason()
        if reason is None:
            options.register_custom_ops_library(str(native.library_path()))
        else:
            warnings.warn(
                f"attn2onnx native kernels unavailable, the ONNX function bodies run instead: {reason}",
                RuntimeWarning,
                stacklevel=3,
            )
    return options


def session(path: Any, backend: str = "ort", *, native: bool = True, threads: int | None = None) -> Any:
    """An ``onnxruntime.InferenceSession`` (CPU) for a model file, ``onnx.ModelProto`` or bytes.

    ``native``: register the attn2onnx kernel library when it is available (built on first use,
    see :mod:`attn2onnx.runtime.native`); otherwise, or with ``native=False``, the ops' function
    bodies run. ``threads``: intra-op threads, 1 .. :func:`thread_limit` (default: ORT's
    choice, one per core); the kernels run on that thread pool."""
    if backend != "ort":
        raise ValueError(f"unknown backend {backend!r}: only 'ort' builds an InferenceSession")
    import onnxruntime as ort

    options = session_options(native_kernels=native, threads=threads)
    if isinstance(path, (str, os.PathLike)):
        from ..onnx_io import load_onnx
        from ..utf8 import check_utf8

        check_utf8(os.fspath(path), "model path")  # ONNX and ORT take UTF-8 paths only

        load_onnx(path)  # external data checked before ORT follows any of it
        model: Any = str(Path(path))
    elif isinstance(path, bytes):
        model = path
    elif hasattr(path, "SerializeToString"):
        model = path.SerializeToString()
    else:
        raise TypeError(f"expected a model path, onnx.ModelProto or bytes, got {type(path).__name__}")
    from ..custom_ops import check_model

    check_model(path)  # every ai.attn2onnx node against its op's rules before ORT sees it
    name = str(path) if isinstance(path, (str, os.PathLike)) else "the in-memory model"
    with load_errors(name):
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


class SessionLoadError(UsageError):
    """A model ONNX Runtime refuses to load (unknown op, bad graph, external data it cannot
    read, ...): one line naming the file. Errors while a session runs are SessionRunError."""


class SessionRunError(UsageError):
    """A loaded model that ONNX Runtime fails to run on the inputs given (a shape or dtype the
    graph cannot take, an id past a Gather's table, a kernel's INVALID_ARGUMENT): one line
    naming the file."""


# ONNX Runtime's exception types for a model it cannot load or run (onnxruntime_pybind11_state).
_ORT_ERRORS = (
    "EPFail",
    "Fail",
    "InvalidArgument",
    "InvalidGraph",
    "InvalidProtobuf",
    "NoSuchFile",
    "NoModel",
    "NotImplemented",
    "RuntimeException",
)


@contextlib.contextmanager
def _ort_errors(error: type[UsageError], what: str, also: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Turn ONNX Runtime's exceptions (and ``also``) inside the block into ``error`` ("WHAT: ORT's message")."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    try:
        yield
    except (*(getattr(state, kind) for kind in _ORT_ERRORS if hasattr(state, kind)), *also) as e:
        message = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", str(e).strip())
        raise error(f"{what}: {message or type(e).__name__}") from None


def load_errors(name: str) -> contextlib.AbstractContextManager[None]:
    """Turn ONNX Runtime's load failures inside the block into :class:`SessionLoadError` for ``name``."""
    return _ort_errors(SessionLoadError, f"{name}: ONNX Runtime cannot load it")


@contextlib.contextmanager
def run_errors(name: str) -> Iterator[Any]:
    """Turn ONNX Runtime's failures while running inside the block into :class:`SessionRunError`
    for ``name``; yields the ``RunOptions`` to run with, which keep ORT's own log of the failure
    off stderr (the error says it once). ``run_with_iobinding`` raises a plain RuntimeError."""
    import onnxruntime as ort

    options = ort.RunOptions()
    options.log_severity_level = 4  # fatal only
    with _ort_errors(SessionRunError, f"{name}: ONNX Runtime failed to run it", (RuntimeError,)):
        yield options
