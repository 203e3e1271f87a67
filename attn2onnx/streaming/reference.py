"""The PyTorch reference of a release folder too large for float32 beside the graph it checks.

``validate`` imports the folder in float32 (:func:`attn2onnx.importers.dcformer.import_dcformer`)
and runs it beside an ONNX Runtime session of the graph. For a 2.8B folder that is 11.4 GB of
float32 weights beside the session (2.2x the graph's weights for fp16, 1.8x for int4): more than
a 24 GB machine has. :func:`release_reference` picks the reference's dtype from what is free:
float32 where it fits, else the release's own bfloat16 (the weights as stored, half the bytes),
else a one-line error before anything loads, and says which. The bf16 model is built on
``meta`` and filled tensor by tensor from the checkpoint (:class:`~.release.ReleaseCheckpoint`,
one layer of float32 at a time): never a float32 copy of the whole model.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UsageError

SESSION_FACTOR = 2.2  # ORT's session / the graph's weight bytes (2.8B: fp16 2.17x, int4 1.82x measured)
HEADROOM = 0.8  # share of the available memory a check may plan on (others' use moves: 2.8B's float32
# reference was chosen at 16.5 GiB available and had 3 GiB left when it was stopped)


def reference_bytes(parameters: int, graph_bytes: int, dtype: str) -> int:
    """Memory of a check: the reference's weights in ``dtype``, the session, the interpreter."""
    from .limits import BASE_BYTES, ITEMSIZE

    return BASE_BYTES + parameters * ITEMSIZE[dtype] + int(SESSION_FACTOR * graph_bytes)


def reference_dtype(parameters: int, graph_bytes: int, memory: int | None) -> str:
    """``fp32`` where a float32 reference fits beside the graph's session in ``memory`` bytes
    (None: unknown, assumed to), else ``bf16``; a UsageError when neither fits. A check plans on
    :data:`HEADROOM` of ``memory``."""
    if memory is None or reference_bytes(parameters, graph_bytes, "fp32") <= HEADROOM * memory:
        return "fp32"
    if reference_bytes(parameters, graph_bytes, "bf16") <= HEADROOM * memory:
        return "bf16"
    gib = 2**30
    raise UsageError(
        f"the check needs ~{reference_bytes(parameters, graph_bytes, 'bf16') / gib:.1f} GiB of memory even with "
        f"a bf16 reference (the ONNX model in ONNX Runtime beside it) and {memory / gib:.1f} GiB is available "
        f"(a check plans on {HEADROOM:.0%} of it); "
        "check a quantized graph (attn2onnx quantize), or on a larger machine"
    )


def release_reference(folder: str | os.PathLike, graph_bytes: int, memory: int | None = None):
    """The CausalLM of the release folder ``folder`` as a ModelSource in the dtype that fits
    beside a graph of ``graph_bytes`` weight bytes (:func:`reference_dtype`; ``memory`` default
    this machine's available memory), and that dtype (``fp32`` / ``bf16``)."""
    from ..sources import from_module
    from .export import TORCH_DTYPES, meta_model
    from .limits import available_memory
    from .release import ReleaseCheckpoint

    checkpoint = ReleaseCheckpoint(Path(folder))
    dtype = reference_dtype(checkpoint.parameters(), graph_bytes, available_memory() if memory is None else memory)
    model = meta_model(checkpoint, dtype)
    state = {}
    for name in checkpoint.shapes:  # the reader keeps one layer of float32 at a time
        state[name] = checkpoint.tensor(name).to(TORCH_DTYPES[dtype])
    model.load_state_dict(state, strict=True, assign=True)
    return from_module(model.eval()), dtype


__all__ = ["HEADROOM", "SESSION_FACTOR", "reference_bytes", "reference_dtype", "release_reference"]
