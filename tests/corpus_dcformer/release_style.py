"""DCMHA written the way the DCFormer PyTorch release writes its inference (prefill) path.

Written here from the release's module structure (``DCMHAttention`` / ``DynamicWeightProjection``
/ ``CrossHeadProjection`` of ``pytorch/dcformer/modeling_dcformer.py``), not copied: the same
state-dict names and layouts (fused ``wqkv``, grouped ``dw1`` [D,G,4,K], ``qkw`` [G,4,K,2I,N],
``dd`` [D,G,4N], ``pre_proj.w`` / ``post_proj.w`` [G,N,N]) and the same tensor forms a stock
export sees: einsums carrying the group axis G, the cross-head projection as a loop over the
rank of rank-1 einsum pairs (``fast_infer=True``) or one einsum pair with the rank axis
(``fast_infer=False``), the RMS norm (no scale) of w1, the optional static ``sw`` mix, RoPE from a
precomputed float16 ``freqs_cis`` table, a boolean mask ``[B|1,1,T,S]`` sliced to the keys and
``finfo(float16).min`` as the fill. ``query_wise`` applies the query-side dynamic weights only.

:class:`ReleaseLM` is a causal LM in the release's structure (token embedding, blocks, final
norm, output head; RoPE rows and the causal / window mask sliced per call from precomputed
buffers), loading a release checkpoint's state dict as it is. ``tests/dcformer_release.py``
is the independent float64 oracle both are checked against.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

WINDOW_TYPES = {"LG": [256, None], "LGLL": [256, None, 256, 256], "LGL6": [256, None] + [256] * 6}


def full_config(config: dict[str, Any]) -> dict[str, Any]:
    """The release's config defaults that matter here, with ``n_local_heads`` / ``intermediate_size`` filled in."""
    c = dict(
        n_local_heads=-1,
        rope_base=500000.0,
        norm_eps=1e-5,
        use_qk_norm=False,
        window_size=256,
        window_type=None,
        query_wise=False,
        use_sw=False,
        block_size=2048,
        intermediate_size=None,
    )
    c.update(config)
    if c["n_local_heads"] == -1:
        c["n_local_heads"] = c["n_head"]
    if c["intermediate_size"] is None:
        hidden = int(2 * (4 * c["dim"]) / 3)
        c["intermediate_size"] = hidden if hidden % 256 == 0 else hidden + 256 - hidden % 256
    return c


def layer_window(c: dict[str, Any], lidx: int) -> int | None:
    """The release's per-layer window: LG alternation without a window_type, else its pattern."""
    if c["window_size"] is None:
        return None
    if c["window_type"] is None:
        return None if lidx % 2 == 1 else c["window_size"]
    pattern = WINDOW_TYPES[c["window_type"]]
    return pattern[lidx % len(pattern)]


def precompute_freqs_cis(length: int, head_dim: int, base: float) -> torch.Tensor:
    """[length, d/2, 2] float16 table of (cos, sin) per position and frequency."""
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(length).float(), inv)
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1).to(torch.float16)


def window_mask(length: int, window: int) -> torch.Tensor:
    """Causal mask keeping keys s with s + window >= t: window + 1 keys per query, as the release does."""
    cols = torch.arange(length)[None, :].expand(length, length)
    rows = torch.arange(length)[:, None].expand(length, length)
    return (cols + window >= rows).tril()


def rotate(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """RoPE in the release's 'half' mode: pairs (i, i + d/2) rotated, output interleaved (a
    permutation of the head dim that q k^T does not see)."""
    pairs = x.float().reshape(*x.shape[:-1], 2, -1).transpose(-1, -2)  # [B,T,H,d/2,2]
    # the release writes view(-1, T, ...): that -1 (always 1) becomes T_table // T_x under
    # torch.export with independent dynamic dims, which its solver rejects; the table's own length is the same
    table = freqs_cis.view(1, freqs_cis.size(0), 1, pairs.size(3), 2)
    cos, sin = table[..., 0], table[..., 1]
    out = torch.stack([pairs[..., 0] * cos - pairs[..., 1] * sin, pairs[..., 1] * cos + pairs[..., 0] * sin], -1)
    return out.flatten(3).type_as(x)


class RMSnormNoscale(nn.Module):
    """RMS norm without a scale (the release's norm of w1 over the head axis)."""

    def __init__(self, epsilon: float = 1e-6) -> None:
        super().__init__()
        self.epsilon = epsilon

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.epsilon)


class RMSnorm(nn.Module):
    """RMS norm with a ``scale`` (the release's QK-norm)."""

    def __init__(self, dim: int, epsilon: float = 1e-6) -> None:
        super().__init__()
        self.epsilon = epsilon
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.epsilon) * self.scale


class RMSNorm(nn.Module):
    """RMS norm with a ``weight`` (block and final norms)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() * torch.rsqrt(torch.mean(x * x, dim=-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class CrossHeadProjection(nn.Module):
    """One compose (pre- or post-softmax) on [B,N,T,S] with the group axis inserted at 1."""

    def __init__(self, num_heads: int, num_groups: int = 1, use_sw: bool = False) -> None:
        super().__init__()
        self.use_sw = use_sw
        per_group = num_heads // num_groups
        if use_sw:
            self.w = nn.Parameter(torch.zeros(num_groups, per_group, per_group))
        else:
            self.register_buffer("w", torch.eye(per_group).expand(num_groups, per_group, per_group).clone())

    def forward(self, inputs: torch.Tensor, dws: tuple, fast_infer: bool = True, query_wise: bool = False):
        qw1, qw2, kw1, kw2, qdd, kdd = dws
        inputs = inputs.unsqueeze(1)  # BNTS -> BGNTS
        ret = torch.einsum("BGMTS,GMN->BGNTS", inputs, self.w) + inputs if self.use_sw else inputs
        sides = [("T", qw1, qw2, qdd)] + ([] if query_wise else [("S", kw1, kw2, kdd)])
        for sym, w1, w2, dd in sides:
            if fast_infer:  # rank-1 einsum pairs, one per hidden unit
                for i in range(w1.shape[-2]):
                    hidden = torch.einsum(f"BGMTS,B{sym}GM->BGTS", inputs, w1[..., i, :])
                    ret = ret + torch.einsum(f"BGTS,B{sym}GM->BGMTS", hidden, w2[..., i, :])
            else:  # the rank axis I inside the einsums
                hidden = torch.einsum(f"BGNTS,B{sym}GIN->BGTSI", inputs, w1)
                ret = ret + torch.einsum(f"BGTSI,B{sym}GIN->BGNTS", hidden, w2)
            ret = ret + torch.einsum(f"BGMTS,B{sym}GM->BGMTS", inputs, dd)
        return ret.squeeze(1)


def _unbind(x: torch.Tensor, n: int, dim: int) -> list[torch.Tensor]:
    return [part.squeeze(dim) for part in torch.split(x, x.shape[dim] // n, dim=dim)]


class DynamicWeightProjection(nn.Module):
    """Per-token dynamic weights from the layer input: w1 (RMS-normed), w2 and tanh gates for the
    four slots (pre query, pre key, post query, post key), group axis G kept."""

    def __init__(self, num_heads: int, query_input_dim: int, num_groups: int = 1, use_sw: bool = False) -> None:
        super().__init__()
        per_group = num_heads // num_groups
        hidden, rank = num_heads * 4, per_group // (num_heads // 2)
        self.dw1 = nn.Parameter(torch.zeros(query_input_dim, num_groups, 4, hidden))
        self.qkw = nn.Parameter(torch.zeros(num_groups, 4, hidden, 2 * rank, per_group))
        self.dd = nn.Parameter(torch.zeros(query_input_dim, num_groups, 4 * per_group))
        self.dw1_norm = RMSnormNoscale()
        self.pre_proj = CrossHeadProjection(num_heads, num_groups, use_sw)
        self.post_proj = CrossHeadProjection(num_heads, num_groups, use_sw)

    def forward(self, query_vec: torch.Tensor) -> tuple[tuple, tuple]:
        hidden = F.gelu(torch.einsum("BTD,DGCK->BTGCK", query_vec, self.dw1))
        w1, w2 = torch.split(torch.einsum("BTGCK,GCKIM->BTGCIM", hidden, self.qkw), self.qkw.shape[-2] // 2, dim=-2)
        w1 = self.dw1_norm(w1)
        pre_qw1, pre_kw1, post_qw1, post_kw1 = _unbind(w1, 4, dim=3)
        pre_qw2, pre_kw2, post_qw2, post_kw2 = _unbind(w2, 4, dim=3)
        dd = torch.tanh(torch.einsum("BTD,DGM->BTGM", query_vec, self.dd))
        pre_qdd, pre_kdd, post_qdd, post_kdd = torch.split(dd, dd.shape[-1] // 4, dim=-1)
        return (
            (pre_qw1, pre_qw2, pre_kw1, pre_kw2, pre_qdd, pre_kdd),
            (post_qw1, post_qw2, post_kw1, post_kw2, post_qdd, post_kdd),
        )


class DCMHAttention(nn.Module):
    """The release's attention layer on a full sequence: ``forward(x, freqs_cis, mask)`` with
    freqs_cis [T, d/2, 2] and a boolean mask [B|1, 1, T, >= T] (sliced to the keys)."""

    def __init__(self, config: dict[str, Any], lidx: int = 0, fast_infer: bool = True) -> None:
        super().__init__()
        c = full_config(config)
        self.n_head, self.dim, self.n_local_heads = c["n_head"], c["dim"], c["n_local_heads"]
        self.head_dim = self.dim // self.n_head
        self.wqkv = nn.Linear(self.dim, (self.n_head + 2 * self.n_local_heads) * self.head_dim, bias=False)
        self.wo = nn.Linear(self.dim, self.dim, bias=False)
        self.dyn_w_proj = DynamicWeightProjection(self.n_head, self.dim, use_sw=c["use_sw"])
        self.use_qk_norm = c["use_qk_norm"]
        if self.use_qk_norm:
            self.q_norm, self.k_norm = RMSnorm(self.head_dim), RMSnorm(self.head_dim)
        self.scale_factor = 1 / math.sqrt(self.head_dim)
        self.query_wise = c["query_wise"]
        self.window_size = layer_window(c, lidx)
        self.fast_infer = fast_infer

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        kv_size = self.n_local_heads * self.head_dim
        q, k, v = self.wqkv(x).split([self.dim, kv_size, kv_size], dim=-1)
        q = q.view(bsz, seqlen, self.n_head, self.head_dim)
        k = k.view(bsz, seqlen, self.n_local_heads, self.head_dim)
        v = v.view(bsz, seqlen, self.n_local_heads, self.head_dim)
        if self.use_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotate(q, freqs_cis), rotate(k, freqs_cis)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        k_mask = mask[:, :, :, : k.shape[-2]]
        pre, post = self.dyn_w_proj(x)
        logits = q @ k.transpose(-2, -1) * self.scale_factor
        logits = self.dyn_w_proj.pre_proj(logits, pre, self.fast_infer, self.query_wise)
        logits = torch.where(k_mask, logits, torch.finfo(torch.float16).min)
        probs = self.dyn_w_proj.post_proj(logits.softmax(-1), post, self.fast_infer, self.query_wise)
        y = (probs @ v).transpose(1, 2).contiguous().view(bsz, seqlen, self.dim)
        return self.wo(y)


class MaskedLayer(nn.Module):
    """One release attention layer with the release's precomputed buffers: ``forward(x)`` slices
    the RoPE rows and the causal (or window) mask by position, as ``DCFormer.forward`` does."""

    def __init__(self, attention: DCMHAttention, rope_base: float, max_len: int) -> None:
        super().__init__()
        self.attention = attention
        self.register_buffer("freqs_cis", precompute_freqs_cis(max_len, attention.head_dim, rope_base))
        w = attention.window_size
        full = torch.tril(torch.ones(max_len, max_len, dtype=torch.bool))
        self.register_buffer("causal_mask", full if w is None else window_mask(max_len, w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_pos = torch.arange(x.shape[1], device=x.device)
        return self.attention(x, self.freqs_cis[input_pos], self.causal_mask[None, None, input_pos])


class MaskInputLayer(nn.Module):
    """One release attention layer whose mask is the caller's: ``forward(x, mask)`` with a bool
    mask [B|1, 1, T, S] passed as it is to ``DCMHAttention.forward(x, freqs_cis, mask)`` (any
    pattern: padding, blocks, a causal mask made by the caller), the RoPE rows sliced by position."""

    def __init__(self, attention: DCMHAttention, rope_base: float, max_len: int) -> None:
        super().__init__()
        self.attention = attention
        self.register_buffer("freqs_cis", precompute_freqs_cis(max_len, attention.head_dim, rope_base))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        input_pos = torch.arange(x.shape[1], device=x.device)
        return self.attention(x, self.freqs_cis[input_pos], mask)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, c: dict[str, Any], lidx: int, fast_infer: bool) -> None:
        super().__init__()
        self.attention = DCMHAttention(c, lidx, fast_infer)
        self.feed_forward = FeedForward(c["dim"], c["intermediate_size"])
        self.attention_norm = RMSNorm(c["dim"], c["norm_eps"])
        self.ffn_norm = RMSNorm(c["dim"], c["norm_eps"])

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class ReleaseLM(nn.Module):
    """Causal LM in the release's structure: ``forward(idx) -> logits``. The mask buffer holds
    the causal mask, or [window mask, causal mask] stacked when the config has a window; each
    call takes rows 0..T-1 of it and of the RoPE table."""

    def __init__(self, config: dict[str, Any], max_len: int = 2048, fast_infer: bool = True) -> None:
        super().__init__()
        c = self.config = full_config(config)
        self.tok_embeddings = nn.Embedding(c["vocab_size"], c["dim"])
        self.layers = nn.ModuleList(Block(c, i, fast_infer) for i in range(c["n_layer"]))
        self.norm = RMSNorm(c["dim"], c["norm_eps"])
        self.output = nn.Linear(c["dim"], c["vocab_size"], bias=False)
        self.register_buffer(
            "freqs_cis", precompute_freqs_cis(max_len, c["dim"] // c["n_head"], c["rope_base"]), persistent=False
        )
        causal = torch.tril(torch.ones(max_len, max_len, dtype=torch.bool))
        stacked = causal if c["window_size"] is None else torch.stack([window_mask(max_len, c["window_size"]), causal])
        self.register_buffer("causal_mask", stacked, persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        input_pos = torch.arange(idx.shape[-1], device=idx.device)
        windowed = self.config["window_size"] is not None
        mask = self.causal_mask[None, None, :, input_pos] if windowed else self.causal_mask[None, None, input_pos]
        freqs_cis = self.freqs_cis[input_pos]
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            layer_mask = mask
            if windowed:
                layer_mask = mask[:, :, 1] if layer.attention.window_size is None else mask[:, :, 0]
            x = layer(x, freqs_cis, layer_mask)
        return self.output(self.norm(x))


def release_layer(
    config: dict[str, Any], state: dict[str, torch.Tensor], lidx: int = 0, fast_infer: bool = True
) -> DCMHAttention:
    """Layer ``lidx``'s attention, its weights taken from a release state dict."""
    layer = DCMHAttention(config, lidx, fast_infer)
    prefix = f"layers.{lidx}.attention."
    layer.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    return layer.eval()


def release_lm(
    config: dict[str, Any], state: dict[str, torch.Tensor], max_len: int = 2048, fast_infer: bool = True
) -> ReleaseLM:
    """The LM with a release state dict loaded as it is (strict)."""
    lm = ReleaseLM(config, max_len, fast_infer)
    lm.load_state_dict(state)
    return lm.eval()
