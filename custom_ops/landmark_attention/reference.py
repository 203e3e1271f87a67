"""LandmarkAttention: the iMHSA core (variants.md section 6), linear in the sequence length.

Queries and keys are average-pooled to L landmarks (q~, k~) with a masked mean over contiguous
segments of the real tokens (or an s x s grid, see
:func:`~attn2onnx.custom_ops._attention_math.segment_weights`), giving two thin maps per head:

    S_Q = q k~^T * scale  [B,N,T,L]        S_K = q~ k^T * scale  [B,N,L,S]

Heads interact through dense N x N maps plus biases, before the softmax (pre mix) and/or after it
(post mix): S'[g] = sum_h M[g,h] S[h] + c[g]. A_Q = softmax over landmarks (empty landmarks
masked), A_K = softmax over keys (padded keys masked); after a post mix the masked entries are
zeroed again, so padding never leaks in. o = A_Q (A_K v), right to left: T x S is never formed.
The op always applies both mixes; a mode that is off passes M = I, c = 0, which is exact.
"""

from __future__ import annotations

import torch

from .._attention_math import landmark_count, masked_softmax, mix_heads, resolve_scale, segment_weights
from .._common import define_op, empty_like_first


def landmark_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor,
    pre_mix_q: torch.Tensor,
    pre_bias_q: torch.Tensor,
    pre_mix_k: torch.Tensor,
    pre_bias_k: torch.Tensor,
    post_mix_q: torch.Tensor,
    post_bias_q: torch.Tensor,
    post_mix_k: torch.Tensor,
    post_bias_k: torch.Tensor,
    landmarks: int,
    grid: int,
    scale: float,
) -> torch.Tensor:
    """q, k, v [B,T,N,d], key_padding_mask [B,T] bool, mixes [N,N], biases [N] -> o [B,T,N,d]."""
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"LandmarkAttention: expected q, k, v [B,T,N,d] of one shape, got {list(q.shape)}, "
            f"{list(k.shape)}, {list(v.shape)}"
        )
    if key_padding_mask.shape != q.shape[:2]:
        raise ValueError(
            f"LandmarkAttention: key_padding_mask must be [B,T] = {list(q.shape[:2])}, "
            f"got {list(key_padding_mask.shape)}"
        )
    heads = q.shape[2]
    for name, mix, bias in (
        ("pre_q", pre_mix_q, pre_bias_q),
        ("pre_k", pre_mix_k, pre_bias_k),
        ("post_q", post_mix_q, post_bias_q),
        ("post_k", post_mix_k, post_bias_k),
    ):
        if mix.shape != (heads, heads) or bias.shape != (heads,):
            raise ValueError(
                f"LandmarkAttention: {name} mix must be [{heads},{heads}] and its bias [{heads}], "
                f"got {list(mix.shape)} and {list(bias.shape)}"
            )
    landmarks = landmark_count(landmarks, grid)
    mask = key_padding_mask.to(torch.bool)
    scale = resolve_scale(scale, q.shape[-1])

    weights, landmark_mask = segment_weights(mask, landmarks, grid, q.dtype)
    q_land = torch.einsum("blt,bthd->bhld", weights, q)
    k_land = torch.einsum("blt,bthd->bhld", weights, k)
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    s_q = mix_heads(torch.matmul(qh, k_land.transpose(-1, -2)) * scale, pre_mix_q, pre_bias_q)
    s_k = mix_heads(torch.matmul(q_land, kh.transpose(-1, -2)) * scale, pre_mix_k, pre_bias_k)
    allowed_q = landmark_mask[:, None, None, :]
    allowed_k = mask[:, None, None, :]
    zero = q.new_zeros(())
    a_q = torch.where(allowed_q, mix_heads(masked_softmax(s_q, allowed_q), post_mix_q, post_bias_q), zero)
    a_k = torch.where(allowed_k, mix_heads(masked_softmax(s_k, allowed_k), post_mix_k, post_bias_k), zero)
    return torch.matmul(a_q, torch.matmul(a_k, vh)).transpose(1, 2).contiguous()


landmark_attention = define_op("landmark_attention", landmark_attention_reference, empty_like_first)
