"""CacheUpdate: a cache buffer with a step's new rows written at a position (shared KV buffers).

    out = buffer;  out[:, position : position + T] = new_rows

buffer [B, S, ...] holds S positions along axis 1 (token-major, the layout of dcmha's decode
caches), new_rows [B, T, ...] the step's rows, position an int64 scalar (or [1]) with
0 <= position <= S - T. Functionally a copy of the buffer; the native kernel writes only the new
rows when ONNX Runtime hands it the buffer itself as the output (the caller binds past and
present to one buffer, as ONNX Runtime GenAI's ``past_present_share_buffer``).
"""

from __future__ import annotations

import torch

from .._common import define_op, empty_like_first


def check_cache_update(buffer: torch.Tensor, new_rows: torch.Tensor, position: int) -> None:
    """ValueError unless new_rows is [B, T, ...] matching buffer [B, S, ...] and the rows fit at ``position``."""
    if buffer.dim() < 2 or new_rows.dim() != buffer.dim():
        raise ValueError(
            f"CacheUpdate: buffer must be [B,S,...] and new_rows [B,T,...] of the same rank, "
            f"got {list(buffer.shape)} and {list(new_rows.shape)}"
        )
    if new_rows.shape[0] != buffer.shape[0] or new_rows.shape[2:] != buffer.shape[2:]:
        raise ValueError(
            f"CacheUpdate: new_rows {list(new_rows.shape)} must match buffer {list(buffer.shape)} on every axis but 1"
        )
    if not 0 <= position <= buffer.shape[1] - new_rows.shape[1]:
        raise ValueError(
            f"CacheUpdate: {new_rows.shape[1]} rows at position {position} do not fit a buffer of {buffer.shape[1]}"
        )


def cache_update_reference(buffer: torch.Tensor, new_rows: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """buffer [B,S,...], new_rows [B,T,...], position int64 scalar or [1] -> buffer with rows
    [position, position + T) replaced by new_rows (a new tensor)."""
    if position.numel() != 1:
        raise ValueError(f"CacheUpdate: position must hold one value, got shape {list(position.shape)}")
    start = int(position.reshape(()))
    check_cache_update(buffer, new_rows, start)
    out = buffer.clone()
    out[:, start : start + new_rows.shape[1]] = new_rows.to(buffer.dtype)
    return out


cache_update = define_op("cache_update", cache_update_reference, empty_like_first)
