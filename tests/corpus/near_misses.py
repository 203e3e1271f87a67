"""Attention-shaped graphs that are NOT standard attention: a fusion of any of them is a bug."""

from __future__ import annotations

import torch

from . import styles as st
from .styles import HEAD, _BmmFolded, _Projections


class SoftmaxOverQueries(_Projections):
    """Softmax over the query axis (dim=-2): columns, not rows, sum to one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        return self.merge(torch.softmax(q @ k.transpose(-1, -2) * HEAD**-0.5, dim=-2) @ v)


class FillWithZero(_Projections):
    """masked_fill(~mask, 0.0): a fill that is not a mask (padded keys keep weight exp(0))."""

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        s = (q @ k.transpose(-1, -2) * HEAD**-0.5).masked_fill(~key_padding_mask[:, None, None, :], 0.0)
        return self.merge(torch.softmax(s, dim=-1) @ v)


class MixOverQueries(_Projections):
    """The probabilities transposed before the mix: values weighted along the wrong axis."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        w = torch.softmax(q @ k.transpose(-1, -2) * HEAD**-0.5, dim=-1)
        return self.merge(w.transpose(-1, -2) @ v)


class LogitsOverTokens(_Projections):
    """q^T k: a d x d product over the tokens (a linear-attention-like mix), softmax over d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        w = torch.softmax(q.transpose(-1, -2) @ k * HEAD**-0.5, dim=-1)  # [B,H,d,d]
        return self.merge(v @ w)


class ScaledAfterSoftmax(_Projections):
    """The probabilities scaled by a learnt per-head gain after the softmax (rows no longer sum to 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = torch.nn.Parameter(torch.linspace(0.5, 2.0, 4).view(1, 4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        w = torch.softmax(q @ k.transpose(-1, -2) * HEAD**-0.5, dim=-1) * self.gain
        return self.merge(w @ v)


class EinsumMixOverQueries(_Projections):
    """An einsum mix contracting the query axis ('bhqk,bhqd->bhkd'): values weighted along the wrong axis."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        w = torch.softmax(torch.einsum("bhqd,bhkd->bhqk", q, k) * HEAD**-0.5, dim=-1)
        return self.merge(torch.einsum("bhqk,bhqd->bhkd", w, v))


class SoftCausalPenalty(_Projections):
    """A Llama-style triu added to the logits, but of -1.0: a soft penalty on future keys, not a
    causal mask (it must stay an additive bias, never the fused op's causal mode)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        t = x.shape[1]
        w = q @ k.transpose(-1, -2) * HEAD**-0.5 + torch.triu(torch.full((t, t), -1.0), diagonal=1)
        return self.merge(torch.softmax(w, dim=-1) @ v)


class FoldedPerHeadWindow(_BmmFolded):
    """Heads folded into the batch, then on the [B, H, T, S] view a boolean mask that differs per
    head (head h sees keys within h + 1 positions: multi-scale local windows): no fused op here
    takes a per-head boolean mask, and one mask for every folded B*H row would be wrong."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.folded(x)
        w = torch.bmm(q, k.transpose(1, 2)) * st.HEAD**-0.5
        pos = torch.arange(t)
        allowed = (pos[:, None] - pos[None, :]).abs()[None] <= torch.arange(1, st.H + 1)[:, None, None]
        w = w.view(b, st.H, t, t).masked_fill(~allowed, float("-inf")).view(b * st.H, t, t)
        return self.unfold(torch.bmm(w.softmax(dim=-1), v), b, t)
