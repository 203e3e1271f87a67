"""SuperMix: super attention's learned token mixing U = WA[:T,:T] x (variants.md section 4).

Computed once per layer and shared by every head. With ``causal`` the mixing matrix is
masked to its lower triangle on every call (without it the layer leaks future tokens); rows
of padded tokens are zeroed before mixing, because WA would mix them into real tokens.

Only the linear part of super's mix: WA's bias and the re-zeroing of U's padded rows are added
by the super module in standard ops after this op (attn2onnx/variants/hosseini.py), so the op
stays exactly the plain ``WA[:T,:T] @ x`` pattern that passes/fuse_super_mix.py fuses into it.
"""

from __future__ import annotations

import torch

from .._common import define_op, empty_like_first


def super_mix_reference(
    x: torch.Tensor, wa: torch.Tensor, key_padding_mask: torch.Tensor, causal: bool
) -> torch.Tensor:
    """x [B,T,D], wa [Lmax,Lmax], key_padding_mask [B,T] bool (True = real) -> U [B,T,D]."""
    t = x.shape[1]
    if t > wa.shape[0]:
        raise ValueError(f"super attention: sequence length {t} exceeds the layer's max_len {wa.shape[0]}")
    mix = wa[:t, :t]
    if causal:
        mix = torch.tril(mix)
    x = x * key_padding_mask.unsqueeze(-1).to(x.dtype)
    return torch.matmul(mix.to(x.dtype), x)


super_mix = define_op("super_mix", super_mix_reference, empty_like_first)
