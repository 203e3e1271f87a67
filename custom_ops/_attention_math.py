"""Torch math shared by the attention ops' references and the variant modules (variants.md).

Written once here and reused everywhere:

* :func:`attention_mask` / :func:`masked_softmax` / :func:`attention` — the masked-softmax
  attention of the contract: logits replaced by ``where(allowed, logits, NEG)`` (never a -inf
  bias) and softmax in fp32 or wider, whatever the input dtype; ``causal`` aligns the queries to
  the end of the keys (query t may see key s iff s <= t + S - T).
* :func:`masked_mean` and the poolings built on it: :func:`window_pool` (kernel = stride = r,
  last window partial, Attention-SH) and :func:`segment_weights` (iMHSA landmarks: contiguous
  segments of each row's real tokens, or an s x s grid of a square token map), plus
  :func:`masked_moments` (Attention-BN key statistics).
* :func:`mix_heads` — a dense N x N map over the head axis plus a per-head bias (iMHSA).

Layouts follow docs/ops.md: q [B,T,N,d], k and v [B,S,N,d], probabilities [B,N,T,S],
key_padding_mask [B,S] bool (True = real token).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._common import NEG


def resolve_scale(scale: float, head_dim: int) -> float:
    """The ops' ``scale`` attribute: 0.0 means 1/sqrt(head_dim)."""
    return scale if scale != 0.0 else 1.0 / math.sqrt(head_dim)


def attention_mask(key_padding_mask: torch.Tensor, t: int, causal: bool) -> torch.Tensor:
    """Allowed (query, key) pairs as a bool [B,1,T,S] tensor from the key mask [B,S]."""
    allowed = key_padding_mask[:, None, None, :]
    if causal:
        s = key_padding_mask.shape[1]
        keys = torch.arange(s, device=key_padding_mask.device)
        queries = torch.arange(t, device=key_padding_mask.device) + (s - t)
        allowed = allowed & (keys[None, :] <= queries[:, None])
    return allowed


def masked_softmax(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis of ``where(allowed, logits, NEG)``, computed in fp32 or wider
    and returned in the logits' dtype. A fully masked row becomes uniform, never NaN."""
    work = logits.to(torch.promote_types(logits.dtype, torch.float32))
    work = torch.where(allowed, work, torch.full((), NEG, dtype=work.dtype, device=work.device))
    return torch.softmax(work, dim=-1).to(logits.dtype)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor,
    scale: float = 0.0,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard masked softmax attention. q [B,T,N,d], k/v [B,S,N,d], key_padding_mask [B,S]
    -> (o [B,T,N,d], probs [B,N,T,S])."""
    scale = resolve_scale(scale, q.shape[-1])
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    logits = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    probs = masked_softmax(logits, attention_mask(key_padding_mask, q.shape[1], causal))
    return torch.matmul(probs, vh).transpose(1, 2), probs


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Mean of ``x`` over ``dim`` counting only entries where ``mask`` is true; 0 where there
    are none. ``mask`` has x's rank, its full size along ``dim`` and size 1 or x's size on the
    other axes. Keeps ``dim``."""
    weight = mask.to(x.dtype)
    return (x * weight).sum(dim, keepdim=True) / weight.sum(dim, keepdim=True).clamp(min=1)


def masked_moments(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (population) variance of x [B,S,N,d] over the real tokens of
    mask [B,S] -> (mu, var), each [B,1,N,d]."""
    m = mask[:, :, None, None]
    mu = masked_mean(x, m, 1)
    var = masked_mean((x - mu) ** 2, m, 1)
    return mu, var


def window_pool(x: torch.Tensor, mask: torch.Tensor, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool x [B,S,...] along tokens by ``factor`` (kernel = stride = factor, the last
    window partial), as a masked mean over the real tokens of mask [B,S].

    Returns (pooled [B,ceil(S/factor),...], pooled_mask [B,ceil(S/factor)]): a window is real
    iff it holds a real token, and an empty window is 0 (also for factor 1)."""
    s = x.shape[1]
    # Non-negative integer arithmetic only: exporters lower floor division of a negative
    # symbolic size as truncation, which would get -(-s // factor) wrong for odd s.
    windows = (s + factor - 1) // factor
    pad = windows * factor - s
    feature_pad = [0, 0] * (x.dim() - 2)
    x = F.pad(x, feature_pad + [0, pad]).unflatten(1, (windows, factor))
    mask = F.pad(mask, [0, pad], value=False).unflatten(1, (windows, factor))
    m = mask.reshape(mask.shape + (1,) * (x.dim() - 3))
    return masked_mean(x, m, 2).squeeze(2), mask.any(dim=2)


def landmark_count(landmarks: int, grid: int) -> int:
    """Number of iMHSA landmarks: ``grid``**2 for s x s grid pooling, else ``landmarks``."""
    if grid < 0 or landmarks <= 0:
        raise ValueError(f"landmarks must be positive and grid >= 0, got landmarks={landmarks}, grid={grid}")
    if grid and landmarks != grid * grid:
        raise ValueError(f"grid {grid} pools to {grid * grid} landmarks, but landmarks={landmarks}")
    return landmarks


def segment_weights(
    key_padding_mask: torch.Tensor, landmarks: int, grid: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """iMHSA landmark pooling as a masked averaging matrix built at run time from the mask.

    1-D (grid = 0): real token t of row b, of rank r among the row's n real tokens, belongs to
    segment floor(r * L / n) (so right padding changes nothing for the real tokens).
    Grid s > 0: the T tokens are a row-major square map of side = sqrt(T) (T must be a perfect
    square) and token (row, col) belongs to cell floor(row * s / side) * s + floor(col * s / side);
    padded tokens keep their place on the map but are left out of the means.

    Returns (weights [B,L,T] in ``dtype``, each row a masked mean or all zero,
    landmark_mask [B,L] bool, false for an empty landmark)."""
    if grid:
        t = key_padding_mask.shape[1]
        side = math.isqrt(t)
        if side * side != t:
            raise ValueError(f"grid pooling needs a square token map, got {t} tokens")
        positions = torch.arange(t, device=key_padding_mask.device)
        segment = ((positions // side) * grid // side * grid + (positions % side) * grid // side)[None, :]
    else:
        ranks = torch.cumsum(key_padding_mask.long(), dim=1) - 1
        n = key_padding_mask.long().sum(dim=1, keepdim=True).clamp(min=1)
        segment = (ranks * landmarks).div(n, rounding_mode="floor")
    ids = torch.arange(landmarks, device=key_padding_mask.device)
    member = (segment[:, None, :] == ids[None, :, None]) & key_padding_mask[:, None, :]
    count = member.sum(dim=2, keepdim=True)
    return member.to(dtype) / count.clamp(min=1).to(dtype), count.squeeze(2) > 0


def mix_heads(s: torch.Tensor, mix: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Head interaction on s [B,N,...]: s'[g] = sum_h mix[g,h] s[h] + bias[g]."""
    mixed = torch.einsum("gh,bh...->bg...", mix, s)
    return mixed + bias.reshape((-1,) + (1,) * (s.dim() - 2))
