"""Inputs of a decode graph (``attn2onnx export --decode``) for ``attn2onnx run``.

A decode graph's inputs are related beyond what their dim names say: after ``past`` cached
positions and ``seq`` new ones, every full cache holds ``past`` positions, a local-window
layer's cache ``min(past, limit)``, and ``attention_mask`` covers ``past + seq`` positions, at
most the model's ``max_len`` (:mod:`attn2onnx.models.decode`; its ``attn2onnx.decode`` metadata,
read and checked by :func:`attn2onnx.runtime.metadata.read_decode`, gives every cache's dims and
limit). Random inputs built from the dim names alone cannot know
``past``; inputs that break the relation run in ONNX Runtime without an error but compute
nothing meaningful. :func:`random_decode_inputs` makes inputs that keep it and
:func:`check_decode_feeds` refuses, in one line, given inputs that do not. A shared-buffer
graph's caches (``meta.shared``) are max_len-long buffers whatever ``past`` is; given ones must
hold at least past + seq positions.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import UsageError
from ..graph_format import CacheSpec
from ..io_spec import InputSpec, random_inputs
from .metadata import DecodeMeta

DEFAULT_PAST = 8  # cached positions of random inputs when the user does not choose (fewer if max_len is short)


def choose_past(meta: DecodeMeta, seq: int, past: int | None) -> int:
    """Cached positions for random inputs of ``seq`` new ones: ``past`` when given (an error
    when past + seq exceeds the model's max_len), else DEFAULT_PAST or what max_len leaves."""
    limit = meta.max_len
    if past is None:
        return max(min(DEFAULT_PAST, limit - seq), 0)
    if past + seq > limit:
        raise UsageError(f"--past {past} + --seq-len {seq} exceeds the model's max_len {limit}")
    return past


def _dim_sizes(meta: DecodeMeta, past: int, seq: int) -> dict[str, int]:
    """Size of every dim name of the decode graph other than batch and seq, after ``past``
    cached positions and ``seq`` new ones."""
    sizes = {"past+seq": past + seq}
    held = meta.max_len if meta.shared else past
    for cache in meta.caches:
        sizes.update((d, n) for d, n in zip(cache.dims, cache.shape(1, held)) if isinstance(d, str) and d != "batch")
    return sizes


def sized_specs(specs: Sequence[InputSpec], meta: DecodeMeta, past: int, seq: int) -> list[InputSpec]:
    """``specs`` with every past dim as its size, so that only batch and seq stay symbolic
    (what io_spec's random inputs and the memory check take)."""
    import dataclasses

    sizes = _dim_sizes(meta, past, seq)
    return [dataclasses.replace(s, dims=tuple(sizes.get(d, d) for d in s.dims)) for s in specs]


def random_decode_inputs(
    specs: Sequence[InputSpec], meta: DecodeMeta, batch: int, seq: int, past: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """Random inputs of a decode step after ``past`` cached positions: random ids over the
    vocabulary and caches, an all-ones attention mask [batch, past + seq] and positions
    past .. past + seq - 1."""
    import dataclasses

    ids, mask, positions = meta.inputs
    specs = [dataclasses.replace(s, high=meta.vocab_size) if s.name == ids else s for s in specs]
    feeds = random_inputs(sized_specs(specs, meta, past, seq), batch, seq, seed=seed)
    feeds[mask] = np.ones((batch, past + seq), dtype=np.int64)
    feeds[positions] = np.broadcast_to(np.arange(past, past + seq, dtype=np.int64), (batch, seq)).copy()
    return feeds


def _past_index(cache: CacheSpec) -> int:
    """Index of the past dim in a cache's dims (the one named dim that is not batch)."""
    return next(i for i, d in enumerate(cache.dims) if isinstance(d, str) and d != "batch")


def check_decode_feeds(meta: DecodeMeta, feeds: dict[str, np.ndarray]) -> None:
    """One-line UsageError for inputs (already checked against the graph's input specs) that
    break the decode contract: attention_mask shorter than the new ids or longer than max_len,
    a full cache whose past is not attention_mask's length minus seq, a window layer's cache
    that does not hold min(past, limit) positions, a shared buffer shorter than past + seq."""
    ids, mask, _ = meta.inputs
    seq, total = feeds[ids].shape[1], feeds[mask].shape[1]
    past = total - seq
    if past < 0:
        raise UsageError(f"{mask} covers {total} positions, fewer than the {seq} new ones of {ids}")
    if total > meta.max_len:
        raise UsageError(f"{mask} covers {total} positions, more than the model's max_len {meta.max_len}")
    for cache in meta.caches:
        held = feeds[cache.input].shape[_past_index(cache)]
        want = cache.shape(1, past)[_past_index(cache)]
        if meta.shared:
            if held < total:
                raise UsageError(
                    f"{cache.input} is a shared buffer of {held} positions, but {mask} covers {total}: "
                    f"it must hold at least past + seq = {total}"
                )
            continue
        if held == want:
            continue
        if cache.limit is None:
            raise UsageError(
                f"{mask} covers {total} positions, but {cache.input} holds {held} past and {ids} {seq} new ones: "
                f"it must cover past + seq = {held + seq}"
            )
        raise UsageError(
            f"{cache.input} holds {held} positions, but its layer keeps the last {cache.limit}: after {past} past "
            f"positions ({mask}'s {total} minus {seq} new ones) it must hold min(past, {cache.limit}) = {want}"
        )


__all__ = ["DEFAULT_PAST", "check_decode_feeds", "choose_past", "random_decode_inputs", "sized_specs"]
