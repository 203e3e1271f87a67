"""Optimised, efficient and super attention written the way Hosseini & Hosseini's public
PyTorch reference code writes them, to test what a stock export of that code fuses into.

Read (not copied): NMesaC/pay-better-attention-pytorch-keras, ``pytorch_implementation/``:
``pytorch_attention_shared_wa.py`` (one ``W_a`` shared by every head of a layer),
``pytorch_attention_indiv_wa.py`` (one ``W_a`` per head) and ``pytorch_imdb_transformer_example.py``
(how a layer is called: ``multi(inp, inp, inp)``, ``d_k = d_v = d_model // n_heads``, positions
``arange(max_len)``, so every input has exactly ``max_len`` tokens). What that code computes, and
what these modules keep of it:

- one ``AttentionLayer`` per head, in an ``nn.Sequential``; ``MultiHeadAttention.forward`` runs
  them in a loop and concatenates as it goes (``H = cat((H.clone(), h_i), 2)``), then ``W_o``
  (``nn.Linear(n_heads * d_v, d_model)``);
- per head ``Q = W_q(inp_q)`` with ``W_q = nn.Linear(d_model, d_k)`` (a per-head projection, with
  bias); optimised also ``K = W_k(inp_k)``; efficient and super take ``K`` and ``V`` as the head's
  column slice ``inp[:, :, idx*d_k:(idx+1)*d_k]`` of the raw input (optimised: ``V`` only);
- ``S = softmax((Q @ K.permute(0,2,1)) / sqrt(d_q))`` with ``nn.Softmax(dim=1)`` on the [B,T,T]
  scores: **the softmax runs over the queries** (each key's column sums to one), not over the keys
  as in the paper and in attn2onnx's own variants;
- super: ``V = W_a(v_slice.permute(0,2,1)).permute(0,2,1)`` with ``W_a = nn.Linear(max_len, max_len)``:
  a mix over the token axis, ``V[t] = sum_s W_a[t,s] v[s] + b[t]``, its bias per *token*, broadcast
  over the channels; so T must equal ``max_len``;
- no mask, no causal option, no dropout inside attention.

Deviations, each on purpose: ``softmax_dim=-1`` gives each module's "softmax over keys" twin (how
users fix the axis in their copies); every bias (``W_q``, ``W_k``, ``W_a``) gets a random init
instead of the published zeros, so a wrong bias path cannot pass the parity tests by luck; the
layer is called with one input ``x`` (self-attention, as the example's encoder calls it). The near
misses at the end are not in the published code: they are what must *not* be normalised.
"""

from __future__ import annotations

import math

import torch
from torch import nn

D, H, MAX_LEN = 32, 4, 16  # the tests' size (the published example: d_model 32, 4 heads, max_len 32)
KINDS = ("optimised", "efficient", "super")


def _linear(fan_in: int, fan_out: int) -> nn.Linear:
    """The published init (xavier-uniform weight) with a random, not zero, bias."""
    layer = nn.Linear(fan_in, fan_out)
    nn.init.xavier_uniform_(layer.weight)
    nn.init.uniform_(layer.bias, -0.5, 0.5)
    return layer


class AttentionLayer(nn.Module):
    """One head ``idx`` of width ``d_head``: forward(inp_q, inp_k, inp_v [B,T,D]) -> [B,T,d_head]."""

    def __init__(
        self, kind: str, d_model: int, d_head: int, idx: int, max_len: int, w_a: nn.Linear | None, softmax_dim: int
    ) -> None:
        super().__init__()
        self.kind, self.d_head, self.idx = kind, d_head, idx
        self.softmax = nn.Softmax(dim=softmax_dim)
        self.W_q = _linear(d_model, d_head)
        if kind == "optimised":
            self.W_k = _linear(d_model, d_head)
        if kind == "super":
            self.W_a = w_a if w_a is not None else _linear(max_len, max_len)

    def cols(self, x: torch.Tensor) -> torch.Tensor:
        """The head's column slice of a raw input."""
        return x[:, :, self.idx * self.d_head : (self.idx + 1) * self.d_head]

    def scores(self, inp_q: torch.Tensor, inp_k: torch.Tensor) -> torch.Tensor:
        """softmax(Q K^T / sqrt(d)) over the published axis (or the twin's)."""
        k = self.W_k(inp_k) if self.kind == "optimised" else self.cols(inp_k)
        return self.softmax((self.W_q(inp_q) @ k.permute(0, 2, 1)) / math.sqrt(self.d_head))

    def values(self, inp_v: torch.Tensor) -> torch.Tensor:
        """The head's values: its slice of the input, mixed over tokens by W_a for super."""
        v = self.cols(inp_v)
        return self.W_a(v.permute(0, 2, 1)).permute(0, 2, 1) if self.kind == "super" else v

    def forward(self, inp_q: torch.Tensor, inp_k: torch.Tensor, inp_v: torch.Tensor) -> torch.Tensor:
        return self.scores(inp_q, inp_k) @ self.values(inp_v)


class MultiHeadAttention(nn.Module):
    """The published head loop: forward(inp_q, inp_k, inp_v) -> [B,T,D]. ``shared_wa``: one W_a
    for every head (``pytorch_attention_shared_wa.py``), else one per head (``..._indiv_wa.py``)."""

    def __init__(
        self,
        kind: str,
        n_heads: int = H,
        d_model: int = D,
        max_len: int = MAX_LEN,
        shared_wa: bool = True,
        softmax_dim: int = 1,
        head_type: type[AttentionLayer] = AttentionLayer,
    ) -> None:
        super().__init__()
        d_head = d_model // n_heads
        self.W_a = _linear(max_len, max_len) if kind == "super" and shared_wa else None
        self.layers = nn.Sequential()
        for i in range(n_heads):
            head = head_type(kind, d_model, d_head, i, max_len, self.W_a, softmax_dim)
            self.layers.add_module(f"Attention_Layer {i}", head)
        self.W_o = _linear(n_heads * d_head, d_model)

    def forward(self, inp_q: torch.Tensor, inp_k: torch.Tensor, inp_v: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            if i == 0:
                out = layer(inp_q, inp_k, inp_v)
            else:
                out = torch.cat((out.clone(), layer(inp_q, inp_k, inp_v)), 2)
        return self.W_o(out)


class SelfAttention(nn.Module):
    """forward(x [B,MAX_LEN,D]) -> [B,MAX_LEN,D]: the layer called as the published encoder calls it."""

    def __init__(self, kind: str, shared_wa: bool = True, softmax_dim: int = 1, **options) -> None:
        super().__init__()
        self.multi = MultiHeadAttention(kind, shared_wa=shared_wa, softmax_dim=softmax_dim, **options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.multi(x, x, x)


# ---------------------------------------------------------------------------------------------
# near misses: close to the published code, but not what it computes; never normalised
# ---------------------------------------------------------------------------------------------
class FeatureMixHead(AttentionLayer):
    """W_a applied to the head's features (no transposes): a value projection over the channels
    (W_a [d, d]), not a token mix."""

    def values(self, inp_v: torch.Tensor) -> torch.Tensor:
        return self.W_a(self.cols(inp_v))


class WaOverFeatures(SelfAttention):
    """Super's loop with W_a over the features (softmax over keys): must not become a SuperMix."""

    def __init__(self) -> None:
        super().__init__("super", softmax_dim=-1, max_len=D // H, head_type=FeatureMixHead)


class MaskedQuerySoftmax(nn.Module):
    """Efficient heads with a key padding mask filled in before the softmax over the queries: a
    masked query softmax is neither an attention kernel's computation nor the published code's."""

    def __init__(self) -> None:
        super().__init__()
        self.multi = MultiHeadAttention("efficient")

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        outs = []
        for head in self.multi.layers:
            s = (head.W_q(x) @ head.cols(x).permute(0, 2, 1)) / math.sqrt(head.d_head)
            s = s.masked_fill(~key_padding_mask[:, None, :], -1e9)
            outs.append(torch.softmax(s, dim=1) @ head.cols(x))
        return self.multi.W_o(torch.cat(outs, 2))
