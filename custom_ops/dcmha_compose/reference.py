"""DcmhaCompose: one DCMHA compose step on a [B,N,T,S] tensor (variants.md section 5).

For every (b, t, s) the head vector a = A[b, :, t, s] (a row vector over the N heads) becomes

    a' = a + (a U_t^T) V_t + (a U_s^T) V_s + a * g_t + a * g_s   (+ a Wb with the static mix)

with the query-side factors (U_t, V_t [R,N], g_t [N]) of token t and the key-side factors of
token s. Factor rows are packed as ``[..., 2R+1, N]``: rows 0..R-1 are U (already RMS-normalised
over heads), rows R..2R-1 are V, row 2R is the gate g. Heads mix only at the same (t, s), so a
compose never mixes positions and cannot leak the future.

The reference works in factorised form (about 10N MACs per (t, s) at R = 2, never an N x N
matrix per position) and computes in fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

import torch

from .._common import define_op, empty_like_first


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the DCMHA references compute in: fp64 for fp64 inputs, fp32 otherwise."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def split_factors(factors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[..., 2R+1, N]`` -> U ``[..., R, N]``, V ``[..., R, N]``, g ``[..., N]``."""
    rows = factors.shape[-2]
    if rows % 2 != 1:
        raise ValueError(f"DCMHA factors need 2R+1 rows (U, V, g), got {rows}")
    r = rows // 2
    return factors[..., :r, :], factors[..., r : 2 * r, :], factors[..., 2 * r, :]


def dcmha_compose_reference(
    a: torch.Tensor,
    q_factors: torch.Tensor,
    k_factors: torch.Tensor,
    static_mix: torch.Tensor,
    use_static_mix: bool,
) -> torch.Tensor:
    """a [B,N,T,S], q_factors [B,T,2R+1,N], k_factors [B,S,2R+1,N], static_mix [N,N] -> [B,N,T,S]."""
    dtype = compute_dtype(a)
    x = a.to(dtype)
    uq, vq, gq = split_factors(q_factors.to(dtype))
    uk, vk, gk = split_factors(k_factors.to(dtype))
    out = x + torch.einsum("brts,btrm->bmts", torch.einsum("bnts,btrn->brts", x, uq), vq)
    out = out + torch.einsum("brts,bsrm->bmts", torch.einsum("bnts,bsrn->brts", x, uk), vk)
    out = out + x * gq.transpose(1, 2).unsqueeze(-1) + x * gk.transpose(1, 2).unsqueeze(-2)
    if use_static_mix:
        out = out + torch.einsum("bnts,nm->bmts", x, static_mix.to(dtype))
    return out.to(a.dtype).contiguous()  # the op's output: contiguous, as its fake says


dcmha_compose = define_op("dcmha_compose", dcmha_compose_reference, empty_like_first)
