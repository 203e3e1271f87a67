"""What a release folder costs in memory and disk, estimated from its config before any work,
and the one-line error when this machine cannot give it (never an out-of-memory kill).

The figures are upper estimates from the parameter counts (no weight is read):

* the streaming export holds the graph and torch (``BASE_BYTES``), one layer's tensors in
  float32 (the import maps a layer at a time), and the largest tensor a few times over
  (float32 read, cast, transposed); it writes the weights once in the export dtype;
* the check after export runs the file in ONNX Runtime (its weights, and as much again for
  pre-packed MatMul weights) beside the float32 PyTorch reference;
* the in-memory export (``attn2onnx export`` on a small folder) holds the float32 model and
  about three copies in the exporter's proto and its serialisation.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from .release import ReleaseCheckpoint

BASE_BYTES = 2 * 2**30  # interpreter, torch, onnx, onnxruntime and the traced graph
ITEMSIZE = {"fp32": 4, "fp16": 2, "bf16": 2}
GRAPH_BYTES = 64 * 2**20  # the .onnx beside its data: graph, op bodies, metadata


def available_memory() -> int | None:
    """Bytes of memory this machine can still give (MemAvailable; else physical memory)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


@dataclass(frozen=True)
class Estimate:
    """Bytes one export of a folder needs, by what needs them."""

    parameters: int
    weight_bytes: int  # the output's weights, in the export dtype
    export_memory: int  # the streaming export's peak
    check_memory: int  # ORT session + float32 reference of the check after export
    in_memory_export: int  # the in-memory path's peak

    def describe(self) -> str:
        return (
            f"{self.parameters / 1e9:.2f}B parameters, {self.weight_bytes / 2**30:.1f} GiB of weights, "
            f"export ~{self.export_memory / 2**30:.1f} GiB of memory"
        )


def estimate(checkpoint: ReleaseCheckpoint, dtype: str) -> Estimate:
    """The :class:`Estimate` of exporting ``checkpoint`` in ``dtype``."""
    sizes = [math.prod(shape) for shape in checkpoint.shapes.values()]
    layers: dict[str, int] = {}
    for name, size in zip(checkpoint.shapes, sizes):
        group = ".".join(name.split(".")[:3]) if name.startswith("trunk.blocks.") else ""
        layers[group] = layers.get(group, 0) + size
    params = sum(sizes)
    weight_bytes = params * ITEMSIZE[dtype]
    export_memory = BASE_BYTES + 4 * max(layers.values()) + 3 * 4 * max(sizes)
    return Estimate(
        parameters=params,
        weight_bytes=weight_bytes,
        export_memory=export_memory,
        check_memory=BASE_BYTES + 2 * weight_bytes + 4 * params,
        in_memory_export=BASE_BYTES + 4 * 4 * params,
    )


def free_disk(path: str | os.PathLike) -> int:
    """Free bytes on the file system that ``path`` (a file to write) would go to."""
    return shutil.disk_usage(Path(path).resolve().parent).free


def check_fits(
    est: Estimate, output: str | os.PathLike, *, check: bool, memory: int | None = None, disk: int | None = None
) -> None:
    """Refuse, with one line saying what would run out and the way out, an export this machine
    cannot finish: its weights more than the output's disk has free, the export's or (with
    ``check``) the parity check's memory more than is available. ``memory`` / ``disk`` override
    what this machine reports (for tests)."""
    memory = available_memory() if memory is None else memory
    disk = free_disk(output) if disk is None else disk
    gib = 2**30
    need_disk = est.weight_bytes + GRAPH_BYTES
    if need_disk > disk:
        raise UsageError(
            f"the export writes {need_disk / gib:.1f} GiB ({est.parameters / 1e9:.2f}B parameters) but "
            f"{Path(output).resolve().parent} has {disk / gib:.1f} GiB free; free space or write elsewhere"
        )
    if memory is None:
        return
    if est.export_memory > memory:
        raise UsageError(
            f"the streaming export needs ~{est.export_memory / gib:.1f} GiB of memory (one layer in float32 and "
            f"the largest tensor), {memory / gib:.1f} GiB is available; no export of this model fits here"
        )
    if check and est.check_memory > memory:
        raise UsageError(
            f"the check after export needs ~{est.check_memory / gib:.1f} GiB of memory (the ONNX model in "
            f"ONNX Runtime and the float32 PyTorch reference), {memory / gib:.1f} GiB is available; "
            "add --no-check (the export alone fits)"
        )


__all__ = ["Estimate", "available_memory", "check_fits", "estimate", "free_disk"]
