"""Standard attention written the ways public PyTorch code writes it, one module per style.

Every module maps ``x`` [B,T,D] (and, where it takes one, a boolean ``key_padding_mask`` [B,T],
True = real token) to [B,T,D]. They are written here from each style's idiom (GPT-2 / nanoGPT,
HF BERT / GPT-2 / Llama, timm ViT, torch's SDPA and nn.MultiheadAttention, einsum, per-head
loops), not copied from those projects. D = 32, H = 4 heads of d = 8 unless said otherwise.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

D, H, MAX_LEN = 32, 4, 256
HEAD = D // H
KV_HEADS = 2  # grouped-query entries: H / KV_HEADS query heads share each key / value head


@contextlib.contextmanager
def sized(d_model: int, heads: int, max_len: int):
    """The styles at another size (benchmarks/corpus.py: realistic D, H and T): the modules read
    D, H, HEAD and MAX_LEN when built and run, so they are set for the block and restored."""
    global D, H, HEAD, MAX_LEN
    saved = D, H, HEAD, MAX_LEN
    D, H, HEAD, MAX_LEN = d_model, heads, d_model // heads, max_len
    try:
        yield
    finally:
        D, H, HEAD, MAX_LEN = saved


class _Projections(nn.Module):
    """Separate q / k / v / out projections and the [B,T,D] <-> [B,H,T,d] head split."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(D, D, bias=bias) for _ in range(4))

    @staticmethod
    def heads(t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, H, HEAD).transpose(1, 2)

    def merge(self, o: torch.Tensor) -> torch.Tensor:
        b, _, n, _ = o.shape
        return self.o(o.transpose(1, 2).reshape(b, n, D))

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.heads(self.q(x)), self.heads(self.k(x)), self.heads(self.v(x))


class NanoGptCausal(nn.Module):
    """nanoGPT: packed c_attn, a registered tril buffer, masked_fill(bias[:, :, :T, :T] == 0, -inf)."""

    def __init__(self) -> None:
        super().__init__()
        self.c_attn, self.c_proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.register_buffer("bias", torch.tril(torch.ones(MAX_LEN, MAX_LEN)).view(1, 1, MAX_LEN, MAX_LEN))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.size()
        q, k, v = self.c_attn(x).split(D, dim=2)
        q, k, v = (z.view(b, t, H, c // H).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(b, t, c)
        return self.c_proj(y)


class Gpt2HfCausal(nn.Module):
    """HF GPT-2: a bool causal buffer sliced [k-q:k, :k], where(causal, w, finfo.min), Div by a
    tensor scale, plus the padding mask as an additive (1 - mask) * finfo.min."""

    def __init__(self) -> None:
        super().__init__()
        self.c_attn, self.c_proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.register_buffer(
            "bias", torch.tril(torch.ones(MAX_LEN, MAX_LEN, dtype=torch.bool)).view(1, 1, MAX_LEN, MAX_LEN)
        )

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (z.view(b, t, H, HEAD).permute(0, 2, 1, 3) for z in self.c_attn(x).split(D, dim=2))
        w = torch.matmul(q, k.transpose(-1, -2)) / torch.full([], v.size(-1) ** 0.5, dtype=x.dtype)
        ql, kl = q.size(-2), k.size(-2)
        causal = self.bias[:, :, kl - ql : kl, :kl]
        w = torch.where(causal, w, torch.full([], torch.finfo(w.dtype).min, dtype=w.dtype))
        w = w + (1.0 - key_padding_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        w = nn.functional.softmax(w, dim=-1)
        o = torch.matmul(w, v).permute(0, 2, 1, 3).contiguous().view(b, t, D)
        return self.c_proj(o)


class TimmVit(nn.Module):
    """timm ViT: qkv.reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0), q * scale."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.scale = HEAD**-0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, H, HEAD).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class TimmVitFused(nn.Module):
    """timm ViT with fused_attn: the same unbind, then F.scaled_dot_product_attention."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, H, HEAD).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class BertAdditive(_Projections):
    """HF BERT: transpose_for_scores (view + permute), scores / sqrt(d) + (1 - mask) * finfo.min,
    dropout on the probabilities (eval: identity)."""

    def __init__(self) -> None:
        super().__init__()
        self.dropout = nn.Dropout(0.1)

    @staticmethod
    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(t.size()[:-1] + (H, HEAD)).permute(0, 2, 1, 3)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(HEAD)
        extended = (1.0 - key_padding_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        probs = self.dropout(nn.functional.softmax(scores + extended, dim=-1))
        ctx = torch.matmul(probs, v).permute(0, 2, 1, 3).contiguous()
        return self.o(ctx.view(ctx.size()[:-2] + (D,)))


def _rotate_half(t: torch.Tensor) -> torch.Tensor:
    a, b = t[..., : t.shape[-1] // 2], t[..., t.shape[-1] // 2 :]
    return torch.cat((-b, a), dim=-1)


class LlamaRopeSdpa(_Projections):
    """Llama style: RoPE from cos / sin buffers with rotate_half, then causal SDPA."""

    def __init__(self) -> None:
        super().__init__(bias=False)
        inv = 1.0 / (10000 ** (torch.arange(0, HEAD, 2).float() / HEAD))
        freqs = torch.outer(torch.arange(MAX_LEN).float(), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos())
        self.register_buffer("sin", emb.sin())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        t = x.shape[1]
        cos, sin = self.cos[:t], self.sin[:t]
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        return self.merge(F.scaled_dot_product_attention(q, k, v, is_causal=True))


class LlamaEager(_Projections):
    """Llama eager attention: RoPE, q k^T * d^-0.5 + an additive causal mask of finfo.min, softmax
    in fp32 then back (.to(q.dtype))."""

    def __init__(self) -> None:
        super().__init__(bias=False)
        inv = 1.0 / (10000 ** (torch.arange(0, HEAD, 2).float() / HEAD))
        emb = torch.outer(torch.arange(MAX_LEN).float(), inv).repeat(1, 2)
        self.register_buffer("cos", emb.cos())
        self.register_buffer("sin", emb.sin())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        t = x.shape[1]
        q = q * self.cos[:t] + _rotate_half(q) * self.sin[:t]
        k = k * self.cos[:t] + _rotate_half(k) * self.sin[:t]
        w = torch.matmul(q, k.transpose(2, 3)) * HEAD**-0.5
        causal = torch.triu(torch.full((t, t), torch.finfo(x.dtype).min, dtype=x.dtype), diagonal=1)
        w = nn.functional.softmax(w + causal, dim=-1, dtype=torch.float32).to(q.dtype)
        return self.merge(torch.matmul(w, v))


class SdpaCausal(_Projections):
    """F.scaled_dot_product_attention(q, k, v, is_causal=True)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        return self.merge(F.scaled_dot_product_attention(q, k, v, is_causal=True))


class SdpaBoolMask(_Projections):
    """F.scaled_dot_product_attention with a boolean key padding attn_mask [B,1,1,S]."""

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        return self.merge(F.scaled_dot_product_attention(q, k, v, attn_mask=key_padding_mask[:, None, None, :]))


class TorchMhaPadding(nn.Module):
    """nn.MultiheadAttention(batch_first=True) with key_padding_mask (True = ignore)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(D, H, batch_first=True)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, key_padding_mask=~key_padding_mask, need_weights=False)[0]


class TorchMhaPadTrue(nn.Module):
    """nn.MultiheadAttention(batch_first=True) given its key_padding_mask input as it is (True = pad)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(D, H, batch_first=True)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, key_padding_mask=key_padding_mask, need_weights=False)[0]


class TorchMhaCausal(nn.Module):
    """nn.MultiheadAttention with a boolean causal attn_mask (True = not allowed)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(D, H, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
        return self.attn(x, x, x, attn_mask=mask, need_weights=False)[0]


class PerHeadLoop(nn.Module):
    """A loop over heads: column slices of the projections, softmax per head, Concat."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        outs = []
        for h in range(H):
            cols = slice(h * HEAD, (h + 1) * HEAD)
            w = torch.softmax(q[..., cols] @ k[..., cols].transpose(1, 2) / math.sqrt(HEAD), dim=-1)
            outs.append(w @ v[..., cols])
        return self.o(torch.cat(outs, dim=-1))


class Einsum(_Projections):
    """einsum('bhtd,bhsd->bhts') logits and einsum('bhts,bhsd->bhtd') mix."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        w = torch.einsum("bhtd,bhsd->bhts", q, k) * HEAD**-0.5
        return self.merge(torch.einsum("bhts,bhsd->bhtd", w.softmax(-1), v))


class EinsumHeadsLast(_Projections):
    """einsum on the view itself, heads second to last: 'bqhd,bkhd->bhqk' and 'bhqk,bkhd->bqhd'."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, H, HEAD) for p in (self.q, self.k, self.v))
        w = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(HEAD)
        return self.o(torch.einsum("bhqk,bkhd->bqhd", w.softmax(dim=-1), v).reshape(b, t, D))


class EinsumHeadsFolded(_Projections):
    """Heads folded into the batch ([B*H, T, d], as fairseq / bmm code does), einsum 'bqd,bkd->bqk'."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (z.reshape(b * H, t, HEAD) for z in self.qkv(x))
        w = torch.einsum("bqd,bkd->bqk", q * HEAD**-0.5, k).softmax(dim=-1)
        return self.merge(torch.einsum("bqk,bkd->bqd", w, v).view(b, H, t, HEAD))


class EinsumEllipsis(_Projections):
    """einsum with an ellipsis for any leading batch / head axes: '...qd,...kd->...qk' and
    '...qk,...kd->...qd'."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        w = torch.einsum("...qd,...kd->...qk", q, k) * HEAD**-0.5
        return self.merge(torch.einsum("...qk,...kd->...qd", w.softmax(-1), v))


class EinsumEllipsisCausal(_Projections):
    """The ellipsis einsums with a causal mask built in forward: masked_fill(~ones(T, T).tril(), -inf)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        t = x.shape[1]
        w = torch.einsum("...qd,...kd->...qk", q / math.sqrt(HEAD), k)
        w = w.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
        return self.merge(torch.einsum("...qk,...kd->...qd", w.softmax(dim=-1), v))


class ScaleOnQ(_Projections):
    """The scale folded into q before the product (q * d^-0.5) @ k^T."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        return self.merge(torch.softmax((q * HEAD**-0.5) @ k.transpose(-1, -2), dim=-1) @ v)


class ScaleOnK(_Projections):
    """The scale on the transposed keys: q @ (k^T / sqrt(d)), heads split with permute."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        return self.merge(torch.softmax(q @ (k.transpose(-1, -2) / math.sqrt(HEAD)), dim=-1) @ v)


class SqrtScaleBoth(_Projections):
    """The scale split between q and k, d^-0.25 each (as some ports of Whisper do)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        s = HEAD**-0.25
        return self.merge(torch.softmax((q * s) @ (k * s).transpose(-1, -2), dim=-1) @ v)


class WhereAllowed(_Projections):
    """This project's own form: torch.where(allowed, s, NEG) on a key padding mask."""

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        s = q @ k.transpose(-1, -2) * HEAD**-0.5
        s = torch.where(key_padding_mask[:, None, None, :], s, torch.tensor(-1e30))
        return self.merge(torch.softmax(s, dim=-1) @ v)


class MaskedFillPadding(_Projections):
    """masked_fill(~mask[:, None, None, :], -inf) on the logits: key padding, -inf fill."""

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        s = q @ k.transpose(-1, -2) / math.sqrt(HEAD)
        s = s.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
        return self.merge(torch.softmax(s, dim=-1) @ v)


class CausalAndPadding(_Projections):
    """Causal tril built in forward AND key padding, one masked_fill(-inf) of the combined mask."""

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        t = x.shape[1]
        allowed = torch.tril(torch.ones(t, t, dtype=torch.bool)) & key_padding_mask[:, None, None, :]
        s = (q @ k.transpose(-1, -2)) * HEAD**-0.5
        return self.merge(torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1) @ v)


class MaskedFillPadTrue(_Projections):
    """masked_fill(key_padding_mask[:, None, None, :], -inf) with the padding input itself as the
    condition: a "True = pad" mask (fairseq's and nn.MultiheadAttention's convention)."""

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        s = q @ k.transpose(-1, -2) / math.sqrt(HEAD)
        s = s.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        return self.merge(torch.softmax(s, dim=-1) @ v)


class TriuMaskedFill(_Projections):
    """masked_fill(triu(ones(T, T, bool), 1), -inf): the strictly upper triangle is the future."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        t = x.shape[1]
        future = torch.triu(torch.ones(t, t, dtype=torch.bool, device=x.device), 1)
        s = (q @ k.transpose(-1, -2)) * HEAD**-0.5
        return self.merge(torch.softmax(s.masked_fill(future, float("-inf")), dim=-1) @ v)


class PadTrueThenTriu(_Projections):
    """Two masked_fills one after the other: "True = pad" key padding, then the triu future."""

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        t = x.shape[1]
        s = (q @ k.transpose(-1, -2)) * HEAD**-0.5
        s = s.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        s = s.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool, device=x.device), 1), float("-inf"))
        return self.merge(torch.softmax(s, dim=-1) @ v)


class SoftmaxFp32Casts(_Projections):
    """Autocast style: logits upcast, softmax in fp32, probabilities cast back (exported fp16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        s = (q @ k.transpose(-1, -2)) * HEAD**-0.5
        return self.merge(torch.softmax(s.float(), dim=-1).to(v.dtype) @ v)


class DropoutEval(_Projections):
    """nn.Dropout on the probabilities (identity in eval) and on the output."""

    def __init__(self) -> None:
        super().__init__()
        self.attn_drop, self.proj_drop = nn.Dropout(0.1), nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        w = self.attn_drop(torch.softmax(q @ k.transpose(-2, -1) * HEAD**-0.5, dim=-1))
        return self.proj_drop(self.merge(w @ v))


class _GroupedProjections(nn.Module):
    """Grouped-query attention's projections (Llama-2-70B / Mistral): KV_HEADS key / value heads."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.o = nn.Linear(D, D, bias=False), nn.Linear(D, D, bias=False)
        self.k, self.v = (nn.Linear(D, KV_HEADS * HEAD, bias=False) for _ in range(2))

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, H, HEAD).transpose(1, 2)
        k, v = (p(x).view(b, t, KV_HEADS, HEAD).transpose(1, 2) for p in (self.k, self.v))
        return q, k, v

    def merge(self, o: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = o.shape
        return self.o(o.transpose(1, 2).reshape(b, t, D))


def repeat_kv(t: torch.Tensor, n_rep: int) -> torch.Tensor:
    """HF Llama's repeat_kv: [B, Hkv, S, d] -> [B, Hkv * n_rep, S, d] by expand + reshape."""
    b, kv, s, d = t.shape
    return t[:, :, None, :, :].expand(b, kv, n_rep, s, d).reshape(b, kv * n_rep, s, d)


class GqaRepeatKvEager(_GroupedProjections):
    """HF Llama eager with GQA: repeat_kv, q k^T * d^-0.5 + triu(finfo.min) causal mask, fp32 softmax."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        k, v = repeat_kv(k, H // KV_HEADS), repeat_kv(v, H // KV_HEADS)
        t = x.shape[1]
        w = torch.matmul(q, k.transpose(2, 3)) * HEAD**-0.5
        w = w + torch.triu(torch.full((t, t), torch.finfo(x.dtype).min, dtype=x.dtype), diagonal=1)
        w = nn.functional.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        return self.merge(torch.matmul(w, v))


class GqaRepeatInterleaveSdpa(_GroupedProjections):
    """GQA with repeat_interleave on the head axis, then causal SDPA."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        k, v = (z.repeat_interleave(H // KV_HEADS, dim=1) for z in (k, v))
        return self.merge(F.scaled_dot_product_attention(q, k, v, is_causal=True))


class GqaSdpaEnable(_GroupedProjections):
    """SDPA's own GQA: F.scaled_dot_product_attention(..., is_causal=True, enable_gqa=True)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        return self.merge(F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))


class GqaPaddingRepeatKv(_GroupedProjections):
    """GQA (repeat_kv) with a key padding mask and no causality (an encoder): K/V expanded once."""

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        k, v = repeat_kv(k, H // KV_HEADS), repeat_kv(v, H // KV_HEADS)
        s = (q @ k.transpose(-1, -2) * HEAD**-0.5).masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
        return self.merge(torch.softmax(s, dim=-1) @ v)


class GqaHfCausalPadding(_GroupedProjections):
    """HF Llama eager with GQA on a padded batch: repeat_kv and one additive mask [B,1,T,S] of
    finfo.min where a key is padding or in the future (causal and padding in one float tensor)."""

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        k, v = repeat_kv(k, H // KV_HEADS), repeat_kv(v, H // KV_HEADS)
        t = x.shape[1]
        allowed = torch.tril(torch.ones(t, t, dtype=torch.bool)) & key_padding_mask[:, None, None, :]
        mask = torch.where(allowed, 0.0, torch.finfo(x.dtype).min).to(x.dtype)
        w = torch.matmul(q, k.transpose(2, 3)) * HEAD**-0.5 + mask
        return self.merge(torch.matmul(nn.functional.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype), v))


class GqaCausalPaddingMaskedFill(_GroupedProjections):
    """GQA with two boolean masks, padding then causality, each a masked_fill(-inf)."""

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        k, v = repeat_kv(k, H // KV_HEADS), repeat_kv(v, H // KV_HEADS)
        t = x.shape[1]
        s = (q @ k.transpose(-1, -2) * HEAD**-0.5).masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
        s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        return self.merge(torch.softmax(s, dim=-1) @ v)


class GqaSdpaPadding(_GroupedProjections):
    """SDPA's own GQA (enable_gqa) with a boolean key padding attn_mask [B,1,1,S]."""

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        mask = key_padding_mask[:, None, None, :]
        return self.merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True))


class GqaTiledCausal(_GroupedProjections):
    """K/V heads tiled with .repeat (head h reads kv head h % Hkv, not h // rep): standard attention
    on the repeated tensors, but not GroupQueryAttention's grouping."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        k, v = (z.repeat(1, H // KV_HEADS, 1, 1) for z in (k, v))
        return self.merge(F.scaled_dot_product_attention(q, k, v, is_causal=True))


class MultiQueryBroadcast(_GroupedProjections):
    """Multi-query attention by broadcasting: one key / value head [B,1,S,d] against every query head."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, H, HEAD).transpose(1, 2)
        k, v = (p(x)[..., :HEAD].unsqueeze(1) for p in (self.k, self.v))
        w = torch.softmax(q @ k.transpose(-1, -2) * HEAD**-0.5, dim=-1)
        return self.merge(w @ v)


class _FairseqAttention(nn.Module):
    """fairseq's MultiheadAttention, time-first: q *= scaling, each of q / k / v
    ``.view(T, B*H, d).transpose(0, 1)`` (heads folded into the batch), ``torch.bmm`` logits
    [B*H, T, S], an additive ``attn_mask`` [T, S] unsqueezed to [1, T, S], the key padding mask
    (True = pad) filled with -inf on the [B, H, T, S] view and viewed back, softmax in fp32, bmm."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(D, D) for _ in range(4))
        self.scaling = HEAD**-0.5

    def attend(
        self, query: torch.Tensor, key_padding_mask: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        tgt_len, bsz, embed_dim = query.size()
        q = self.q_proj(query)
        k = self.k_proj(query)
        v = self.v_proj(query)
        q *= self.scaling
        q = q.contiguous().view(tgt_len, bsz * H, HEAD).transpose(0, 1)
        k = k.contiguous().view(-1, bsz * H, HEAD).transpose(0, 1)
        v = v.contiguous().view(-1, bsz * H, HEAD).transpose(0, 1)
        src_len = k.size(1)
        attn_weights = torch.bmm(q, k.transpose(1, 2))
        if attn_mask is not None:
            attn_mask = attn_mask.unsqueeze(0)
            attn_weights += attn_mask
        if key_padding_mask is not None:
            attn_weights = attn_weights.view(bsz, H, tgt_len, src_len)
            attn_weights = attn_weights.masked_fill(
                key_padding_mask.unsqueeze(1).unsqueeze(2).to(torch.bool), float("-inf")
            )
            attn_weights = attn_weights.view(bsz * H, tgt_len, src_len)
        attn_weights = F.softmax(attn_weights.float(), dim=-1).type_as(attn_weights)
        attn = torch.bmm(attn_weights, v)
        attn = attn.transpose(0, 1).contiguous().view(tgt_len, bsz, embed_dim)
        return self.out_proj(attn)


def fairseq_future_mask(t: int) -> torch.Tensor:
    """fairseq's TransformerDecoder.buffered_future_mask: triu(fill_with_neg_inf(zeros(T, T)), 1)."""
    return torch.triu(torch.zeros([t, t]).float().fill_(float("-inf")), 1)


class FairseqEncoderPadding(_FairseqAttention):
    """A fairseq encoder layer: x.transpose(0, 1) to time-first [T,B,D], key_padding_mask True = pad."""

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        return self.attend(x.transpose(0, 1), key_padding_mask=~key_padding_mask).transpose(0, 1)


class FairseqEncoderPadTrue(_FairseqAttention):
    """A fairseq encoder layer given its key_padding_mask (True = pad) as it is, as fairseq does."""

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        return self.attend(x.transpose(0, 1), key_padding_mask=key_padding_mask).transpose(0, 1)


class FairseqDecoderCausal(_FairseqAttention):
    """A fairseq decoder's self-attention: time-first, the future mask as attn_mask, no padding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.transpose(0, 1)
        return self.attend(x, attn_mask=fairseq_future_mask(x.size(0))).transpose(0, 1)


class FairseqDecoderCausalPadding(_FairseqAttention):
    """A fairseq decoder's self-attention with both the future mask and the key padding mask."""

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        x = x.transpose(0, 1)
        mask = fairseq_future_mask(x.size(0))
        return self.attend(x, key_padding_mask=~key_padding_mask, attn_mask=mask).transpose(0, 1)


class _BmmFolded(_Projections):
    """torch.bmm code: heads split, then folded into the batch with reshape(B*H, T, d)."""

    def folded(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        return tuple(z.reshape(b * H, t, HEAD) for z in self.qkv(x))

    def unfold(self, o: torch.Tensor, b: int, t: int) -> torch.Tensor:
        return self.merge(o.view(b, H, t, HEAD))


class BmmCausalBias(_BmmFolded):
    """bmm logits [B*H, T, S] plus a [T, S] causal bias of finfo.min above the diagonal."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.folded(x)
        w = torch.bmm(q, k.transpose(1, 2)) / math.sqrt(HEAD)
        w = w + torch.full((t, t), torch.finfo(x.dtype).min).triu(1)
        return self.unfold(torch.bmm(w.softmax(dim=-1), v), b, t)


class BmmTrilMaskedFill(_BmmFolded):
    """bmm logits [B*H, T, S], masked_fill with a boolean [T, S] built in forward (tril == 0)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.folded(x)
        w = torch.bmm(q * HEAD**-0.5, k.transpose(1, 2))
        w = w.masked_fill(torch.tril(torch.ones(t, t)) == 0, float("-inf"))
        return self.unfold(torch.bmm(torch.softmax(w, dim=-1), v), b, t)


class BmmAlibiPadding(_BmmFolded):
    """BLOOM's ALiBi as torch.bmm code: a per-head slope times each key's position counted from the
    row's first real token (build_alibi_tensor: ``(cumsum(mask) - 1) * mask``), folded to
    [B*H, 1, S] and added by ``baddbmm``: a bias that differs along the folded B*H axis."""

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.folded(x)
        slopes = 2.0 ** (-8.0 * torch.arange(1, H + 1, dtype=x.dtype) / H)
        real = key_padding_mask.to(x.dtype)
        positions = ((real.cumsum(-1) - 1) * real)[:, None, :]
        alibi = (slopes[None, :, None] * positions).reshape(b * H, 1, t)
        w = torch.baddbmm(alibi, q, k.transpose(1, 2), beta=1.0, alpha=HEAD**-0.5)
        return self.unfold(torch.bmm(w.softmax(dim=-1), v), b, t)


class BloomViewAlibi(_BmmFolded):
    """BLOOM's eager layout: baddbmm of the folded ALiBi [B*H,1,S] and q k^T on folded heads, the
    logits viewed as [B,H,T,S] for an additive padding mask (finfo.min) and the softmax, the
    probabilities viewed back to [B*H,T,S] for the bmm with v."""

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.folded(x)
        slopes = 2.0 ** (-8.0 * torch.arange(1, H + 1, dtype=x.dtype) / H)
        real = key_padding_mask.to(x.dtype)
        alibi = (slopes[None, :, None] * ((real.cumsum(-1) - 1) * real)[:, None, :]).reshape(b * H, 1, t)
        w = torch.baddbmm(alibi, q, k.transpose(1, 2), beta=1.0, alpha=HEAD**-0.5).view(b, H, t, -1)
        mask = torch.where(key_padding_mask[:, None, None, :], 0.0, torch.finfo(x.dtype).min)
        probs = torch.softmax(w + mask, dim=-1, dtype=torch.float32).to(x.dtype).view(b * H, t, -1)
        return self.unfold(torch.bmm(probs, v), b, t)


class T5RelativeBiasPadding(_Projections):
    """T5's encoder attention: no scale, a relative position bias [1,H,T,S] (a bucketed embedding,
    here a learned table sliced to T) added to the logits, then the additive padding mask."""

    def __init__(self) -> None:
        super().__init__(bias=False)
        self.relative = nn.Parameter(torch.randn(1, H, MAX_LEN, MAX_LEN) * 0.5)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        t = x.shape[1]
        mask = torch.where(key_padding_mask[:, None, None, :], 0.0, torch.finfo(x.dtype).min)
        w = q @ k.transpose(-1, -2) + self.relative[:, :, :t, :t]
        return self.merge(torch.softmax(w + mask, dim=-1) @ v)


class Gemma2SoftCap(_GroupedProjections):
    """Gemma 2 eager: repeat_kv, logits * scaling, tanh soft-capping (``/ cap -> tanh -> * cap``)
    before the additive causal + padding mask. The scaling is large and the cap small, so the
    logits saturate the tanh and a fusion that dropped the cap would be far off."""

    CAP = 2.0

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        k, v = repeat_kv(k, H // KV_HEADS), repeat_kv(v, H // KV_HEADS)
        t = x.shape[1]
        w = torch.matmul(q, k.transpose(2, 3)) * 4.0
        w = torch.tanh(w / self.CAP) * self.CAP
        allowed = torch.tril(torch.ones(t, t, dtype=torch.bool)) & key_padding_mask[:, None, None, :]
        w = w + torch.where(allowed, 0.0, torch.finfo(x.dtype).min)
        return self.merge(torch.matmul(nn.functional.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype), v))
