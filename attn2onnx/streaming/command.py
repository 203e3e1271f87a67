"""``attn2onnx export FOLDER`` for release folders too large for the in-memory path.

:func:`streams` says whether a folder goes this way (safetensors weights of at least
:data:`STREAM_FROM` bytes in float32); :func:`export_release` checks the sizes against this
machine first (:mod:`.limits`: one line, before any work), exports streaming
(:func:`.export.export_streamed`) and runs the usual check after export when it fits.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from ..errors import UsageError

STREAM_FROM = 2**30  # float32 weight bytes from which a release folder is exported streaming


def streams(args: argparse.Namespace) -> bool:
    """Whether ``args.model`` is a large release folder (:func:`large_release`)."""
    return large_release(args.model)


def large_release(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a DCFormer release folder of safetensors weights that holds at least
    :data:`STREAM_FROM` bytes once in float32 (read from the headers, nothing loaded)."""
    folder = Path(path)
    if not folder.is_dir() or not any(folder.glob("*.safetensors")):
        return False
    from safetensors import safe_open

    from ..importers.transformers_folder import is_transformers_folder

    if is_transformers_folder(folder):  # transformers builds those: the in-memory path
        return False
    numbers = 0
    try:  # the headers' shapes only; what is wrong in the weights, the importer says
        for path in folder.glob("*.safetensors"):
            with safe_open(str(path), framework="pt") as f:
                numbers += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    except Exception:  # noqa: BLE001 - a damaged file: the in-memory path's importer names it
        return False
    return numbers * 4 >= STREAM_FROM


def export_release(args: argparse.Namespace) -> int:
    """Export the release folder ``args.model`` streaming (export's arguments: output, dtype,
    decode, opset, batch, seq_len, no_check, optimize, target and the check's options); the
    exit code."""
    from ..commands.export import finish_check, opset_errors
    from ..sources import load_source
    from ..validate import check_parity
    from .export import export_streamed
    from .limits import check_fits, estimate
    from .release import ReleaseCheckpoint

    if args.static:
        raise UsageError("--static is not supported for a streamed release folder; its graph has dynamic dims")
    if args.decode and args.optimize:
        raise UsageError("--optimize is not supported with --decode yet")
    checkpoint = ReleaseCheckpoint(args.model)
    check_fits(estimate(checkpoint, args.dtype), args.output, check=not args.no_check)
    batch, seq = args.batch or 2, args.seq_len or 16
    if seq > checkpoint.spec.block_size:
        raise UsageError(f"--seq-len {seq} exceeds the model's maximum sequence length {checkpoint.spec.block_size}")
    with opset_errors(args.opset):
        result = export_streamed(
            args.model,
            args.output,
            dtype=args.dtype,
            decode=args.decode,
            opset=args.opset,
            batch=batch,
            seq=seq,
            checkpoint=checkpoint,
        )
    extra = f", {len(result.inputs) - 3} cache inputs" if args.decode else ""
    print(
        f"wrote {result.path} (weights streamed to {result.path.name}.data): {result.nodes} nodes, "
        f"{result.custom_nodes} ai.attn2onnx{extra}, exported in {result.seconds:.1f} s"
    )
    if args.optimize:
        from ..passes import optimize

        report = optimize(args.output, args.output, target=args.target)
        print(f"optimized for {args.target}: {report.before.nodes} -> {report.after.nodes} nodes")
    if args.no_check:
        return 0
    from ..commands.validate import check_options

    source = load_source(args.model)
    if args.decode:
        report = check_parity(result.path, source.module, decode=True, steps=4, **check_options(args))
    else:
        shapes = [(batch, seq), (batch + 1, max(1, seq // 2 + 1))]
        report = check_parity(result.path, source, shapes, dtype=args.dtype, **check_options(args))
    return finish_check(args, report)


__all__ = ["STREAM_FROM", "export_release", "large_release", "streams"]
