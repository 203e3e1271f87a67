"""DCMHA: Dynamically Composable Multi-Head Attention (Xiao et al., DCFormer, ICML 2024).

variants.md section 5. The attention scores of the N heads are mixed at every (query t, key s)
by small per-token matrices computed from the layer input x itself, once on the logits (pre,
before masking) and once on the probabilities (post). Per token and per slot c (0 pre/query,
1 pre/key, 2 post/query, 3 post/key):

    h_c = gelu(x dw1[:, c])                      [K]
    Z_c = h_c qkw[c]  -> U_c = Z_c[:R], V_c = Z_c[R:]   ([R,N] each)
    U_c[r] <- U_c[r] / sqrt(mean_n U_c[r,n]^2 + 1e-6)  (RMS over heads, no gain)
    g_c = tanh(x dd)[c N:(c+1) N]                [N]

The module computes these factors and hands everything else to the ``ai.attn2onnx``
``DcmhaAttention`` op (``torch.ops.attn2onnx.dcmha_attention``), whose eager implementation
is the plain-PyTorch reference and whose backward differentiates it, so the module trains.

Parameters (beyond ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``):
    ``dw1`` [D,4,K], ``qkw`` [4,K,2R,N], ``dd`` [D,4N];
    ``q_norm_gain``, ``k_norm_gain`` [d] when ``qk_norm``;
    ``static_mix_weight`` [2,N,N] (pre, post) when ``static_mix``.

Choices where the paper leaves a detail open (see the options):
- GELU is the exact erf form (the authors' PyTorch port); ``gelu_approx="tanh"`` gives the tanh
  form that their JAX training code used (flax ``nn.gelu`` defaults to it).
- QK-norm (RMS over d, eps 1e-6, learned gain) runs before RoPE; RoPE is rotate-half, base
  ``rope_base``, on the first ``rotary_dim`` channels of each head (partial rotary).
- ``window`` W keeps W keys including the query's own (0 <= t - s <= W - 1), as the authors'
  JAX training mask does; needs ``causal``. ``window_plus_one`` keeps W + 1 keys
  (0 <= t - s <= W), as the authors' PyTorch release (``make_window_mask``) computes: the
  importer of their checkpoints (:mod:`attn2onnx.importers.dcformer`) sets it.
- ``kv_heads`` < N shares each K/V head among N / kv_heads consecutive query heads (grouped- /
  multi-query attention; the release's ``n_local_heads``); K and V are expanded to N heads
  right after their projections, so the attention core and the decode cache see N heads.
- ``rope_fp16_table`` rounds RoPE's cos / sin to float16 before rotating, as the release's
  ``precompute_freqs_cis`` does (it caches them in float16 whatever the model's dtype).
- Initialisation follows the authors' JAX code: dw1 ~ N(0, 2/(D+K)), qkw ~ N(0, (0.01 * 2 /
  (N+R))^2 / K), dd ~ N(0, (0.005)^2 * 2/(D+N)), static mix ~ N(0, (0.1)^2 / N): small but
  non-zero, so a fresh layer already composes heads a little.
  :meth:`DcmhaAttention.zero_dynamic_weights` turns every head mixing off (the layer is then
  exactly multi-head attention with the same QK-norm / RoPE).

Decoding: :meth:`DcmhaAttention.init_cache` / :meth:`DcmhaAttention.forward_step` keep K, V and
the key-side factors per token (``[B,S,2,2R+1,N]``: 10N numbers per token at R = 2), never
merged N x N matrices; a windowed layer keeps only the last W - 1 tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..custom_ops import torch_ops  # noqa: F401  (registers torch.ops.attn2onnx.dcmha_attention)
from .base import AttentionConfig, VariantError, VariantInfo, check_input, register_variant, split_heads
from .mha import CacheEntry

RMS_EPS = 1e-6
SLOTS = 4  # pre/query, pre/key, post/query, post/key


@dataclass
class DcmhaConfig(AttentionConfig):
    """DCMHA options. ``k_dim`` (K, the dynamic-weight hidden size) defaults to 4N.

    ``window`` (local attention over the last W keys including the query's own) needs
    ``causal`` and 1 <= W <= ``max_len``. ``rotary_fraction`` of each head's channels get RoPE
    (rounded down to even).
    """

    rank: int = 2
    k_dim: int | None = None
    qk_norm: bool = False
    rope: bool = False
    rope_base: float = 10000.0
    rotary_fraction: float = 1.0
    window: int | None = None
    window_plus_one: bool = False
    static_mix: bool = False
    gelu_approx: str = "none"
    kv_heads: int | None = None
    rope_fp16_table: bool = False

    # Published models (name -> options of every layer; ``window`` only on the local layers,
    # which are the even-numbered ones: DCFormer alternates local and global layers "LG").
    PUBLISHED: ClassVar[dict[str, dict]] = {
        # DCFormer-2.8B (Pile 300B): D 2560, N 32, d 80, no biases. The authors' configuration
        # class and JAX config say QK-norm off for this size.
        "dcformer-2.8b": dict(
            d_model=2560, n_heads=32, bias=False, qk_norm=False, rope=True, rope_base=10000.0, max_len=2048
        ),
        # DCPythia-6.9B: D 4096, N 32, d 128, biases, QK-norm, partial rotary 25 %.
        "dcpythia-6.9b": dict(
            d_model=4096,
            n_heads=32,
            bias=True,
            qk_norm=True,
            rope=True,
            rope_base=10000.0,
            rotary_fraction=0.25,
            max_len=2048,
        ),
        # DCFormer++ 405M (the paper's scaling runs): D 1024, N 16, d 64, QK-norm.
        "dcformer-405m": dict(
            d_model=1024, n_heads=16, bias=False, qk_norm=True, rope=True, rope_base=10000.0, max_len=2048
        ),
    }
    PUBLISHED_WINDOW: ClassVar[int] = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k_dim is None:
            self.k_dim = 4 * self.n_heads
        if self.kv_heads is None:
            self.kv_heads = self.n_heads
        if self.kv_heads < 1 or self.n_heads % self.kv_heads:
            raise VariantError(f"dcmha: kv_heads must divide n_heads {self.n_heads}, got {self.kv_heads}")
        if self.rank < 1 or self.k_dim < 1:
            raise VariantError(f"dcmha: rank and k_dim must be positive, got {self.rank} and {self.k_dim}")
        if self.window is not None:
            if self.window < 1:
                raise VariantError(f"dcmha: window must be >= 1 (keys including the query's own), got {self.window}")
            if self.window > self.max_len:
                raise VariantError(
                    f"dcmha: window {self.window} is longer than max_len {self.max_len} "
                    "(no sequence has that many keys; leave window out for global attention)"
                )
            if not self.causal:
                raise VariantError("dcmha: a local window needs causal=True")
        elif self.window_plus_one:
            raise VariantError("dcmha: window_plus_one needs a window")
        if self.gelu_approx not in ("none", "tanh"):
            raise VariantError(f"dcmha: gelu_approx must be 'none' or 'tanh', got {self.gelu_approx!r}")
        if not 0.0 < self.rotary_fraction <= 1.0:
            raise VariantError(f"dcmha: rotary_fraction must be in (0, 1], got {self.rotary_fraction}")
        if self.rope and self.rotary_dim < 2:
            raise VariantError(f"dcmha: rotary_fraction {self.rotary_fraction} leaves no channel pair to rotate")

    @property
    def window_keys(self) -> int:
        """Keys a windowed query sees, its own included (W, or W + 1 with window_plus_one); 0: no window."""
        if self.window is None:
            return 0
        return self.window + 1 if self.window_plus_one else self.window

    @property
    def rotary_dim(self) -> int:
        """Channels per head that RoPE rotates (even)."""
        return int(self.head_dim * self.rotary_fraction) // 2 * 2

    @classmethod
    def published(cls, name: str, layer: int = 0, **overrides) -> "DcmhaConfig":
        """Config of layer ``layer`` of a published model (``PUBLISHED``): R = 2, K = 4N, both
        composes, causal, and a 256-key local window on even layers (global on odd ones)."""
        try:
            options = dict(cls.PUBLISHED[name])
        except KeyError:
            raise VariantError(f"unknown DCMHA preset {name!r}; known: {', '.join(cls.PUBLISHED)}") from None
        options.update(causal=True, rank=2, k_dim=None, window=cls.PUBLISHED_WINDOW if layer % 2 == 0 else None)
        options.update(overrides)
        return cls(**options)


@dataclass
class DcmhaCache:
    """Decode state of one layer: per cached token its K, V (after QK-norm and RoPE), its
    key-side factors ``[B,S,2,2R+1,N]`` and padding flag; ``position`` counts every token seen
    (the RoPE position of the next one), which exceeds S once a window layer drops old keys."""

    k: torch.Tensor
    v: torch.Tensor
    k_factors: torch.Tensor
    key_padding_mask: torch.Tensor
    position: int = 0


def apply_rope(
    x: torch.Tensor, positions: torch.Tensor, base: float, rotary_dim: int, fp16_table: bool = False
) -> torch.Tensor:
    """Rotate-half RoPE on the first ``rotary_dim`` channels of x [B,T,N,d] at ``positions`` [T]
    or [B,T] (per sequence, as a decode step's position_ids)
    (``fp16_table``: cos / sin rounded to float16 first, as the DCFormer release does)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    half = rotary_dim // 2
    inv_freq = base ** (-torch.arange(half, device=x.device, dtype=dtype) * 2 / rotary_dim)
    angles = (positions.to(dtype)[..., None] * inv_freq)[..., None, :]  # [(B,)T,1,half]
    cos, sin = torch.cos(angles), torch.sin(angles)
    if fp16_table:
        cos, sin = cos.half().to(dtype), sin.half().to(dtype)
    x1, x2, rest = x[..., :half].to(dtype), x[..., half:rotary_dim].to(dtype), x[..., rotary_dim:]
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
    return torch.cat([rotated, rest], dim=-1)


def rms_norm(x: torch.Tensor, gain: torch.Tensor | None = None, eps: float = RMS_EPS) -> torch.Tensor:
    """x / sqrt(mean(x^2 over the last axis) + eps) (* gain)."""
    x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    return x if gain is None else x * gain


class DcmhaAttention(nn.Module):
    """DCMHA layer: ``forward(x [B,T,D], key_padding_mask [B,T] | None) -> y [B,T,D]``."""

    def __init__(self, config: DcmhaConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        D, N, d, K, R = c.d_model, c.n_heads, c.head_dim, c.k_dim, c.rank
        self.q_proj = nn.Linear(D, D, bias=c.bias)
        self.k_proj = nn.Linear(D, c.kv_heads * d, bias=c.bias)
        self.v_proj = nn.Linear(D, c.kv_heads * d, bias=c.bias)
        self.o_proj = nn.Linear(D, D, bias=c.bias)
        self.dw1 = nn.Parameter(torch.empty(D, SLOTS, K))
        self.qkw = nn.Parameter(torch.empty(SLOTS, K, 2 * R, N))
        self.dd = nn.Parameter(torch.empty(D, SLOTS * N))
        if c.qk_norm:
            self.q_norm_gain = nn.Parameter(torch.ones(d))
            self.k_norm_gain = nn.Parameter(torch.ones(d))
        if c.static_mix:
            self.static_mix_weight = nn.Parameter(torch.empty(2, N, N))
        self.reset_dynamic_weights()

    @torch.no_grad()
    def reset_dynamic_weights(self) -> None:
        """The authors' (JAX) initialisation of the head-mixing weights: small, non-zero."""
        c = self.config
        D, N, K, R = c.d_model, c.n_heads, c.k_dim, c.rank
        nn.init.normal_(self.dw1, std=math.sqrt(2.0 / (D + K)))
        nn.init.normal_(self.qkw, std=math.sqrt(1.0 / K) * 2.0 / (N + R) * 0.01)
        nn.init.normal_(self.dd, std=math.sqrt(2.0 / (D + N)) * 0.005)
        if c.static_mix:
            nn.init.normal_(self.static_mix_weight, std=math.sqrt(1.0 / N) * 0.1)

    @torch.no_grad()
    def zero_dynamic_weights(self) -> "DcmhaAttention":
        """Turn all head mixing off (dw1, qkw, dd and the static mix to zero): the layer is then
        exactly multi-head attention with the same QK-norm / RoPE."""
        for p in (self.dw1, self.qkw, self.dd):
            p.zero_()
        if self.config.static_mix:
            self.static_mix_weight.zero_()
        return self

    def dynamic_factors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B,T,D] -> (q_factors, k_factors), each [B,T,2,2R+1,N] (pre, post; rows U, V, g)."""
        c = self.config
        R, N = c.rank, c.n_heads
        hidden = F.gelu((x @ self.dw1.flatten(1)).unflatten(-1, (SLOTS, c.k_dim)), approximate=c.gelu_approx)
        z = torch.einsum("btck,ckrn->btcrn", hidden, self.qkw)  # [B,T,4,2R,N]
        u, w = z.split(R, dim=3)
        gate = torch.tanh(x @ self.dd).unflatten(-1, (SLOTS, 1, N))  # [B,T,4,1,N]
        factors = torch.cat([rms_norm(u), w, gate], dim=3).unflatten(2, (2, 2))  # [B,T,pre/post,q/k,2R+1,N]
        return factors[:, :, :, 0], factors[:, :, :, 1]

    def _project(self, x: torch.Tensor, start: int | torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q, k, v [B,T,N,d] (QK-norm, RoPE at positions start..start+T-1, or at ``start``
        itself when it is a tensor of positions [B,T]) and the factors."""
        c = self.config
        q = split_heads(self.q_proj(x), c.n_heads)
        k, v = (split_heads(proj(x), c.kv_heads) for proj in (self.k_proj, self.v_proj))
        if c.kv_heads < c.n_heads:  # each K/V head serves n_heads / kv_heads consecutive query heads
            k, v = (t.repeat_interleave(c.n_heads // c.kv_heads, dim=2) for t in (k, v))
        if c.qk_norm:
            q, k = rms_norm(q, self.q_norm_gain), rms_norm(k, self.k_norm_gain)
        if c.rope:
            positions = start if isinstance(start, torch.Tensor) else torch.arange(x.shape[1], device=x.device) + start
            q = apply_rope(q, positions, c.rope_base, c.rotary_dim, c.rope_fp16_table)
            k = apply_rope(k, positions, c.rope_base, c.rotary_dim, c.rope_fp16_table)
        q_factors, k_factors = self.dynamic_factors(x)
        return q, k, v, q_factors, k_factors

    def _attend(self, q, k, v, q_factors, k_factors, key_padding_mask) -> torch.Tensor:
        c = self.config
        static = self.static_mix_weight if c.static_mix else q.new_zeros(2, c.n_heads, c.n_heads)
        o = torch.ops.attn2onnx.dcmha_attention(
            q, k, v, q_factors, k_factors, key_padding_mask, static, 0.0, c.causal, c.window_keys, c.static_mix
        )
        return self.o_proj(o.flatten(-2))

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = check_input(x, key_padding_mask, self.config.d_model)
        q, k, v, q_factors, k_factors = self._project(x, 0)
        return self._attend(q, k, v, q_factors, k_factors, mask)

    def init_cache(self, batch_size: int, device=None, dtype: torch.dtype | None = None) -> DcmhaCache:
        """An empty decode cache for ``batch_size`` sequences (causal layers only)."""
        c = self.config
        if not c.causal:
            raise VariantError("dcmha: step-by-step decoding needs causal=True")
        device = device if device is not None else self.q_proj.weight.device
        dtype = dtype if dtype is not None else self.q_proj.weight.dtype
        kv = torch.zeros(batch_size, 0, c.n_heads, c.head_dim, device=device, dtype=dtype)
        return DcmhaCache(
            k=kv,
            v=kv.clone(),
            k_factors=torch.zeros(batch_size, 0, 2, 2 * c.rank + 1, c.n_heads, device=device, dtype=dtype),
            key_padding_mask=torch.zeros(batch_size, 0, dtype=torch.bool, device=device),
        )

    def forward_step(
        self, x: torch.Tensor, cache: DcmhaCache, key_padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, DcmhaCache]:
        """Attend the new tokens x [B,T,D] (one or a chunk) to the cache and themselves.

        Returns the outputs [B,T,D] and the updated cache; running a sequence through in any
        split equals :meth:`forward` on the whole sequence, row by row."""
        mask = check_input(x, key_padding_mask, self.config.d_model)
        q, k, v, q_factors, k_factors = self._project(x, cache.position)
        cache = DcmhaCache(
            k=torch.cat([cache.k, k], dim=1),
            v=torch.cat([cache.v, v], dim=1),
            k_factors=torch.cat([cache.k_factors, k_factors], dim=1),
            key_padding_mask=torch.cat([cache.key_padding_mask, mask], dim=1),
            position=cache.position + x.shape[1],
        )
        y = self._attend(q, cache.k, cache.v, q_factors, cache.k_factors, cache.key_padding_mask)
        window = self.config.window_keys
        if window:  # the next query reaches back window_keys - 1 tokens at most
            start = max(cache.k.shape[1] - (window - 1), 0)
            cache = replace(
                cache,
                k=cache.k[:, start:],
                v=cache.v[:, start:],
                k_factors=cache.k_factors[:, start:],
                key_padding_mask=cache.key_padding_mask[:, start:],
            )
        return y, cache

    def cache_entries(self) -> list[CacheEntry]:
        """What a decode step caches per layer (:meth:`decode_step`): K and V after QK-norm and
        RoPE, and the key-side compose factors; a local-window layer keeps window_keys - 1.

        All three are token-major ([batch, past, ...]: not Optimum's head-major K / V), the layout
        DcmhaAttention reads in place, so a step extends each cache with one Concat and nothing else."""
        c = self.config
        limit = c.window_keys - 1 if c.window_keys else None
        tokens = ("batch", "past", c.n_heads, c.head_dim)
        return [
            CacheEntry("key", tokens, "K after QK-norm and RoPE [batch, past, heads, head_dim]", limit),
            CacheEntry("value", tokens, "V [batch, past, heads, head_dim]", limit),
            CacheEntry(
                "key_factors",
                ("batch", "past", 2, 2 * c.rank + 1, c.n_heads),
                "key-side compose factors [batch, past, pre/post, 2R+1 (U, V, g), heads]",
                limit,
            ),
        ]

    def decode_step(
        self, x: torch.Tensor, key_mask: torch.Tensor, positions: torch.Tensor, cache: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """:meth:`forward_step` with explicit cache tensors, for export: x [B,T,D], key_mask
        [B,P+T] bool over every past and new position (a window layer reads its last keys),
        positions [B,T] (RoPE), cache (K [B,S,N,d], V, key factors [B,S,2,2R+1,N]) with S <= P.
        Returns y [B,T,D] and the cache extended by T positions (cut to the window)."""
        q, k, v, q_factors, k_factors = self._project(x, positions)
        k, v, k_factors = (torch.cat([past, new], dim=1) for past, new in zip(cache, (k, v, k_factors)))
        keys = k.shape[1]
        y = self._attend(q, k, v, q_factors, k_factors, key_mask[:, key_mask.shape[1] - keys :])
        limit = self.config.window_keys - 1 if self.config.window_keys else None
        if limit is not None:  # the next query reaches back limit tokens at most
            start = torch.sym_max(keys - limit, 0)
            k, v, k_factors = k[:, start:], v[:, start:], k_factors[:, start:]
        return y, (k, v, k_factors)


INFO = register_variant(
    VariantInfo(
        name="dcmha",
        config_cls=DcmhaConfig,
        module_cls=DcmhaAttention,
        paper="Xiao et al., DCFormer (ICML 2024)",
        causal=True,
        params="4D^2 + 4DK + 8KRN + 4DN (+2d QK-norm, +2N^2 static mix)",
        families=("lm", "encoder", "layer"),
    )
)
