"""iMHSA and reuse-transformer layers written in plain PyTorch (never imports attn2onnx).

They are the *input* of the fusions in ``attn2onnx.passes.fuse_imhsa`` / ``fuse_reuse``: exported with the stock
``torch.onnx.export`` (see :func:`plain_dcmha.export_stock`) they are standard ops only.

* :class:`PlainImhsa` -- iMHSA (variants.md §6) with landmark pooling by a [B,L,T] averaging
  matrix built at run time from the key padding mask (masked mean over contiguous segments of
  each row's real tokens: the contract's pooling), key-less / query-less maps, head mixing
  ``S'[g] = sum_h M[g,h] S[h] + c[g]`` (``style="einsum"`` or ``style="matmul"`` over the head
  axis moved last), masked softmaxes, and the right-to-left product ``A_Q (A_K v)``.
* :class:`PlainReuseStack` -- a reuse transformer stack (variants.md §7): layer 0 computes
  ``softmax(where(allowed, q k^T / sqrt(d), NEG))`` probabilities; later layers reuse the first
  ``P_l`` heads of the previous layer's probabilities by slicing, with their own values.

Near misses (they look alike but are not the ops' math, the passes must leave them alone):
:class:`UnmaskedPoolImhsa` (pooling ignores the mask: segments over all T positions) and
:class:`WrongAxisMixImhsa` (the mix runs over the landmark axis, L = N) and
:class:`ColumnSoftmaxReuseStack` (probabilities normalised over queries).
"""

from __future__ import annotations

import math

import torch
from torch import nn

NEG = -1e30


class _Heads(nn.Module):
    """q/k/v/o projections and the [B,T,D] <-> [B,N,T,d] head split shared by the layers."""

    def __init__(self, d_model: int, n_heads: int, gen: torch.Generator) -> None:
        super().__init__()
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        std = 1.0 / math.sqrt(d_model)
        self.wq, self.wk, self.wv, self.wo = (
            nn.Parameter(torch.randn(d_model, d_model, generator=gen) * std) for _ in range(4)
        )

    def split(self, y: torch.Tensor) -> torch.Tensor:
        b, t, _ = y.shape
        return y.reshape(b, t, self.n_heads, self.head_dim).transpose(1, 2)

    def merge(self, o: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = o.shape
        return o.transpose(1, 2).reshape(b, t, self.d_model) @ self.wo


# ---------------------------------------------------------------------------------------------
# iMHSA
# ---------------------------------------------------------------------------------------------
def segment_pooling(key_padding_mask: torch.Tensor, landmarks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B,T] bool -> (weights [B,L,T], landmark_mask [B,L]): real token of rank r among the row's
    n real tokens belongs to segment floor(r L / n); each row of weights is a mean or all zero."""
    m = key_padding_mask.long()
    ranks = torch.cumsum(m, dim=1) - 1
    n = m.sum(dim=1, keepdim=True).clamp(min=1)
    segment = torch.div(ranks * landmarks, n, rounding_mode="floor")
    ids = torch.arange(landmarks, device=key_padding_mask.device)
    member = (segment[:, None, :] == ids[None, :, None]) & key_padding_mask[:, None, :]
    count = member.sum(dim=2, keepdim=True)
    return member.float() / count.clamp(min=1).float(), count.squeeze(2) > 0


def unmasked_pooling(key_padding_mask: torch.Tensor, landmarks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`segment_pooling` but segments over all T positions, padding included."""
    b, t = key_padding_mask.shape
    pos = torch.arange(t, device=key_padding_mask.device)
    segment = torch.div(pos * landmarks, t, rounding_mode="floor")
    ids = torch.arange(landmarks, device=key_padding_mask.device)
    member = (segment[None, :] == ids[:, None]).float()  # [L,T]
    member = member / member.sum(dim=1, keepdim=True).clamp(min=1)
    count = (segment[None, :] == ids[:, None]).sum(dim=1)
    return member[None].expand(b, landmarks, t), (count > 0)[None].expand(b, landmarks)


class PlainImhsa(nn.Module):
    """iMHSA (variants.md §6), pre mixing with dense N x N maps and biases; ``rezero`` zeroes the
    masked probabilities after the softmaxes as the contract does (without it only a row with no
    real token differs)."""

    pooling = staticmethod(segment_pooling)

    def __init__(
        self,
        d_model: int = 32,
        n_heads: int = 4,
        landmarks: int = 3,
        style: str = "einsum",
        rezero: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.rezero = rezero
        gen = torch.Generator().manual_seed(seed)
        self.heads = _Heads(d_model, n_heads, gen)
        self.landmarks, self.style = landmarks, style
        n = n_heads
        self.mix_q = nn.Parameter(torch.eye(n) + 0.3 * torch.randn(n, n, generator=gen))
        self.mix_k = nn.Parameter(torch.eye(n) + 0.3 * torch.randn(n, n, generator=gen))
        self.bias_q = nn.Parameter(0.2 * torch.randn(n, generator=gen))
        self.bias_k = nn.Parameter(0.2 * torch.randn(n, generator=gen))

    def mix(self, s: torch.Tensor, m: torch.Tensor, c: torch.Tensor, side: str) -> torch.Tensor:
        """s [B,N,X,Y] -> sum_h m[g,h] s[:,h] + c[g] (``side``: "q" key-less map, "k" query-less)."""
        if self.style == "einsum":
            return torch.einsum("gh,bhxy->bgxy", m, s) + c[:, None, None]
        return (s.permute(0, 2, 3, 1) @ m.t() + c).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        h = self.heads
        q, k, v = h.split(x @ h.wq), h.split(x @ h.wk), h.split(x @ h.wv)
        weights, landmark_mask = self.pooling(key_padding_mask, self.landmarks)
        q_l = weights[:, None] @ q  # [B,N,L,d]
        k_l = weights[:, None] @ k
        scale = 1.0 / math.sqrt(h.head_dim)
        s_q = self.mix(q @ k_l.transpose(-1, -2) * scale, self.mix_q, self.bias_q, "q")  # [B,N,T,L]
        s_k = self.mix(q_l @ k.transpose(-1, -2) * scale, self.mix_k, self.bias_k, "k")  # [B,N,L,T]
        allowed_q = landmark_mask[:, None, None, :]
        allowed_k = key_padding_mask[:, None, None, :]
        a_q = torch.softmax(torch.where(allowed_q, s_q, NEG), -1)
        a_k = torch.softmax(torch.where(allowed_k, s_k, NEG), -1)
        if self.rezero:  # the contract's form: a row with no real token gives 0, not a uniform mean
            a_q, a_k = torch.where(allowed_q, a_q, 0.0), torch.where(allowed_k, a_k, 0.0)
        return h.merge(a_q @ (a_k @ v))


class UnmaskedPoolImhsa(PlainImhsa):
    """Near miss: pooling segments cover every position, padded ones too (not the op's pooling)."""

    pooling = staticmethod(unmasked_pooling)


class WrongAxisMixImhsa(PlainImhsa):
    """Near miss: the key-less map is mixed over its landmark axis (L = N), not over heads."""

    def mix(self, s: torch.Tensor, m: torch.Tensor, c: torch.Tensor, side: str) -> torch.Tensor:
        if side == "q":
            return torch.einsum("gh,bnxh->bnxg", m, s) + c
        return super().mix(s, m, c, side)


# ---------------------------------------------------------------------------------------------
# reuse
# ---------------------------------------------------------------------------------------------
class PlainReuseStack(nn.Module):
    """A reuse transformer stack (variants.md §7), residual connections, schedule ``reuse``
    (layer 0 computes; layer l reuses the first reuse[l] heads of the probabilities passed on)."""

    softmax_axis = -1

    def __init__(
        self,
        d_model: int = 32,
        n_heads: int = 4,
        reuse: tuple[int, ...] = (0, 4, 2, 2),
        causal: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        assert reuse[0] == 0
        gen = torch.Generator().manual_seed(seed)
        self.layers = nn.ModuleList(_Heads(d_model, n_heads, gen) for _ in reuse)
        self.reuse, self.causal, self.n_heads = reuse, causal, n_heads

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        allowed = key_padding_mask[:, None, None, :]
        if self.causal:
            allowed = allowed & torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        probs = None
        for layer, p in zip(self.layers, self.reuse):
            v = layer.split(x @ layer.wv)
            parts, outs = [], []
            if p < self.n_heads:
                q, k = layer.split(x @ layer.wq)[:, p:], layer.split(x @ layer.wk)[:, p:]
                logits = q @ k.transpose(-1, -2) / math.sqrt(layer.head_dim)
                fresh = torch.softmax(torch.where(allowed, logits, NEG), dim=self.softmax_axis)
                parts.append(fresh)
                outs.append(fresh @ v[:, p:])
            if p:
                reused = probs[:, :p]
                parts.append(reused)
                outs.insert(0, reused @ v[:, :p])
            probs = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
            x = x + layer.merge(torch.cat(outs, dim=1) if len(outs) > 1 else outs[0])
        return x


class ColumnSoftmaxReuseStack(PlainReuseStack):
    """Near miss: the producing layers normalise over queries (softmax on axis -2), not keys."""

    softmax_axis = -2
