"""Decode export with shared KV buffers (``export --decode --shared-kv``; issue 21 item 1).

The growing-cache decode graph (:mod:`.decode`) returns each cache as a fresh present one
position longer than its past, so every step copies every cache. Here past and present are one
max-length buffer per cache ([batch, heads, max_cache, head_dim]), bound by the caller as both
input and output and written in place (by ``com.microsoft.GroupQueryAttention`` for standard attention, by
``ai.attn2onnx::CacheUpdate`` for dcmha's DcmhaAttention layers), the valid length being
attention_mask's, as ONNX Runtime GenAI's ``past_present_share_buffer`` runs its models.
:func:`share_decode_graph` rewrites an ``optimize --target ort`` decode graph
(:mod:`passes.shared_kv`, :mod:`passes.shared_dcmha`) and marks its metadata ``"cache": "shared"``
(:mod:`attn2onnx.runtime.metadata`), which :class:`attn2onnx.generate.DecodeSession` reads.

Covered: the variants whose decode attention is standard attention on separate K / V caches,
and dcmha (its local-window layers too: their buffers hold every position, the window is in the
key mask) (:data:`SHARED_VARIANTS`); every other causal variant is refused with the reason in
:data:`NOT_SHARED`. A transformers folder's decode graph (variant ``transformers:<model_type>``)
is shared where its attention fuses to MultiHeadAttention over Concat-grown caches
(:mod:`passes.shared_hf_kv`: Llama-family GQA + RoPE, GPT-2, ...); otherwise the rewrite's
one-line reason refuses it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import onnx

from ..errors import UsageError
from ..graph_format import DECODE_KEY, past_dim
from ..io_spec import METADATA_KEY as INPUTS_KEY
from ..runtime.metadata import SHARED_DIM, require_decode

SHARED_VARIANTS = ("mha", "optimised", "efficient", "dcmha")
NOT_SHARED = {
    "super": "each new U row is a WA-weighted sum of every cached x row, computed outside attention: "
    "a standard op that reads a buffer's valid rows copies them, the copy shared buffers remove",
    "reuse": "its heads pass post-softmax probabilities to the next layer, which GroupQueryAttention does "
    "not return; the standard-op attention that does (ProbAttention) would attend every buffer position",
}


TRANSFORMERS = "transformers:"  # a transformers folder's variant prefix (importers.transformers_decode)


def check_shareable(variant: str) -> None:
    """A one-line UsageError for a variant the shared form does not cover, with the reason (a
    transformers folder's graph is checked by the rewrite: :mod:`passes.shared_hf_kv`)."""
    if variant not in SHARED_VARIANTS and not variant.startswith(TRANSFORMERS):
        reason = NOT_SHARED.get(variant, f"the shared form covers {', '.join(SHARED_VARIANTS)} only")
        raise UsageError(f"--shared-kv is not supported for {variant}: {reason}")


def _shared_metadata(model: onnx.ModelProto, cache_inputs: set[str]) -> None:
    """The decode and input descriptions of ``model`` with every cache's past dim SHARED_DIM,
    ``"cache": "shared"``, and a cache's second output (``alias``) where the pass added one."""
    from ..passes.shared_kv import ALIAS_SUFFIX

    props = {p.key: p.value for p in model.metadata_props}
    decode = json.loads(props[DECODE_KEY])
    decode["cache"] = "shared"
    outputs = {o.name for o in model.graph.output}
    for cache in decode["caches"]:
        cache["dims"] = [SHARED_DIM if d == past_dim(cache["limit"]) else d for d in cache["dims"]]
        cache["limit"] = None  # a window layer's buffer holds every position too
        if cache["output"] + ALIAS_SUFFIX in outputs:
            cache["alias"] = cache["output"] + ALIAS_SUFFIX
    props[DECODE_KEY] = json.dumps(decode)
    if INPUTS_KEY in props:
        rows = json.loads(props[INPUTS_KEY])
        for row in rows:
            if row["name"] in cache_inputs:
                row["dims"] = [SHARED_DIM if str(d).startswith("past") else d for d in row["dims"]]
        props[INPUTS_KEY] = json.dumps(rows)
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)


def share_decode_graph(in_path: str | os.PathLike, out_path: str | os.PathLike) -> int:
    """Write the shared-buffer form of the ``optimize --target ort`` decode graph at ``in_path``
    to ``out_path`` (checked, atomic); returns how many attention layers it rewrote."""
    from ..passes.shared_dcmha import share_dcmha_buffers
    from ..passes.shared_hf_kv import share_hf_kv_buffers
    from ..passes.shared_kv import SharedKvError, share_kv_buffers

    from ..onnx_io import check_model, load_onnx, save_model

    model = load_onnx(str(in_path))
    meta = require_decode(model, str(in_path))
    if meta.shared:
        raise UsageError(f"{in_path} already has shared KV buffers")
    check_shareable(meta.variant)
    rewrite = share_dcmha_buffers if meta.variant == "dcmha" else share_kv_buffers
    if meta.variant.startswith(TRANSFORMERS):
        rewrite = share_hf_kv_buffers
    if rewrite is not share_dcmha_buffers and any(c.limit is not None for c in meta.caches):
        raise UsageError("--shared-kv covers local-window caches of dcmha only")
    try:
        count = rewrite(model, [(c.input, c.output) for c in meta.caches], *meta.inputs[:2], SHARED_DIM)
    except SharedKvError as e:
        hint = "" if rewrite is share_dcmha_buffers else " (optimize the decode graph for target ort first)"
        if rewrite is share_hf_kv_buffers:
            hint = f" ({meta.variant}: its attention is not the fused form --shared-kv rewrites)"
        raise UsageError(f"--shared-kv: {e}{hint}") from None
    _shared_metadata(model, {c.input for c in meta.caches})
    save_model(model, out_path, check=check_model)
    return count


def export_shared_decode(model, path: str | os.PathLike, opset: int = 23):
    """Export ``model`` (a CausalLM of a :data:`SHARED_VARIANTS` variant) as a shared-buffer
    decode graph at ``path``: the decode export, optimised for ORT, rewritten. Returns the
    decode export's ExportResult with ``path`` set to the written graph."""
    import dataclasses

    from ..passes import optimize
    from .decode import check_decodable, export_decode

    lm = check_decodable(model)
    check_shareable(getattr(getattr(lm, "config", None), "variant", type(lm).__name__))
    with tempfile.TemporaryDirectory() as folder:
        growing = Path(folder) / "growing.onnx"
        result = export_decode(model, growing, opset)
        optimize(growing, growing, target="ort")
        share_decode_graph(growing, path)
    return dataclasses.replace(result, path=Path(path))


__all__ = ["NOT_SHARED", "SHARED_VARIANTS", "check_shareable", "export_shared_decode", "share_decode_graph"]
