"""Fused DCMHA attention core as one flash-style Triton kernel (CUDA dispatch of
``attn2onnx::dcmha_attention`` and the body of the TensorRT AOT plugin).

Contract: ``DcmhaAttention`` in docs/ops.md (variants.md section 5)::

    L  = q k^T * scale                    per head, [N, T, S]
    L  = Compose(L, pre)                  on the unmasked logits, mixes heads at each (t, s)
    L  = where(allowed, L, NEG)           causal (aligned to the end of the keys), window, padding,
                                          and the optional attn_mask (HAS_MASK)
    P  = softmax(L)                       fp32
    P  = Compose(P, post)
    o  = P v

The [B, N, T, S] tensor is never materialised. A program owns one batch row and one block of
``BLOCK_M`` queries and holds *all heads* of every (query block, key block) tile as a
``[BLOCK_H, BLOCK_M, BLOCK_N]`` tensor, so both composes run in place on the tile:

* pass 1 sweeps the key blocks once: logits, pre-compose, masks, online row max and row sum
  per (head, query) -- nothing else is kept;
* pass 2 sweeps them again: recompute the logits and the pre-compose, normalise with the
  pass-1 statistics, post-compose across heads, accumulate ``P' v`` in fp32.

Key blocks that causal/window masking disallows for every query of the block are skipped (the
optional ``attn_mask`` is read per tile through its strides, 0 on broadcast axes, and skips nothing).
A query row with no allowed key at all gets exactly what the contract gives it (every logit
is NEG, so P is uniform over all S keys): pass 1 notices the empty rows and pass 2 then sweeps
every key block for that query block.

Register budget: the fp32 output accumulator of a program is ``[heads, BLOCK_M, BLOCK_D]``.
For the published sizes (N = 32, d = 80 or 128) all heads do not fit, so the grid has a third
axis over *head groups*: every program still computes (and composes) the probabilities of all
heads, because the post-compose needs them, but accumulates ``P' v`` only for its
``HEADS_PER_PROGRAM`` output heads. ``HEADS_PER_PROGRAM = N`` is the single-group layout.
The logits are computed in chunks of ``BLOCK_DK`` channels so that the ``q``/``k`` operands
of one tile stay small whatever d is (d = 80 is five chunks of 16, no padding waste).

Kernel arguments follow the TensorRT AOT plugin convention (input pointers, int32 scalars,
output pointers): the same kernel is compiled to PTX by trt_plugin.py, where the mask pointer and
its strides are compile-time constants (None, 0: the plugin takes no attn_mask). Tensors must be
contiguous; ``scale``, ``causal``, ``window`` and ``use_static_mix`` are compile-time
constants (TensorRT AOT extra arguments can only be int32, and they are model constants).

On the CPU the kernel runs under Triton's interpreter: set ``TRITON_INTERPRET=1`` before
triton is first imported (Triton decides at decoration time), then pass CPU tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

NEG = -1e30  # custom_ops._common.NEG (kept literal here: the kernel needs a constexpr)
TORCH_OP = "attn2onnx::dcmha_attention"
KERNEL_NAME = "dcmha_attention_fwd"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _load_factor(base_ptr, tok_off, tok_ok, heads, N: tl.constexpr, ROW: tl.constexpr, TOK_AXIS: tl.constexpr):
    """One factor row (U_r, V_r or g) of every head: [BLOCK_H, BLOCK_tok] (TOK_AXIS = 1)."""
    if TOK_AXIS == 1:
        ptrs = base_ptr + tok_off[None, :] + ROW * N + heads[:, None]
        mask = tok_ok[None, :] & (heads < N)[:, None]
    else:
        ptrs = base_ptr + tok_off[:, None] + ROW * N + heads[None, :]
        mask = tok_ok[:, None] & (heads < N)[None, :]
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _compose(
    a,
    a_self,
    qf_ptr,
    q_off,
    q_ok,
    kf_ptr,
    k_off,
    k_ok,
    wb_ptr,
    heads,
    out_heads,
    N: tl.constexpr,
    R: tl.constexpr,
    BLOCK_H: tl.constexpr,
    OUT_H: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_STATIC_MIX: tl.constexpr,
):
    """Compose on a tile: a [BLOCK_H, BLOCK_M, BLOCK_N] (all heads) -> [OUT_H, BLOCK_M, BLOCK_N]
    for the heads ``out_heads`` (a_self = a restricted to those heads).

    a' = a + sum_r (a.U_t[r]) V_t[r] + sum_r (a.U_s[r]) V_s[r] + a*g_t + a*g_s (+ a Wb).
    ``q_off``/``k_off`` point at the factor slot of each query/key token ([2R+1, N] rows).
    """
    g_t = _load_factor(qf_ptr, q_off, q_ok, out_heads, N, 2 * R, 1)  # [OUT_H, BLOCK_M]
    g_s = _load_factor(kf_ptr, k_off, k_ok, out_heads, N, 2 * R, 1)  # [OUT_H, BLOCK_N]
    out = a_self * (1.0 + g_t[:, :, None] + g_s[:, None, :])
    for r in tl.static_range(R):
        u_t = _load_factor(qf_ptr, q_off, q_ok, heads, N, r, 1)  # [BLOCK_H, BLOCK_M]
        u_s = _load_factor(kf_ptr, k_off, k_ok, heads, N, r, 1)  # [BLOCK_H, BLOCK_N]
        v_t = _load_factor(qf_ptr, q_off, q_ok, out_heads, N, R + r, 1)
        v_s = _load_factor(kf_ptr, k_off, k_ok, out_heads, N, R + r, 1)
        p_t = tl.sum(a * u_t[:, :, None], axis=0)  # [BLOCK_M, BLOCK_N]
        p_s = tl.sum(a * u_s[:, None, :], axis=0)
        out += p_t[None, :, :] * v_t[:, :, None] + p_s[None, :, :] * v_s[:, None, :]
    if USE_STATIC_MIX:
        # (a Wb)[h'] = sum_h a[h] Wb[h, h']: wbt[h', h] = Wb[h, h']
        wbt = tl.load(
            wb_ptr + heads[None, :] * N + out_heads[:, None],
            mask=(out_heads < N)[:, None] & (heads < N)[None, :],
            other=0.0,
        ).to(tl.float32)
        if BLOCK_H >= 16 and OUT_H >= 16:
            # batched over query rows: [BLOCK_M, OUT_H, BLOCK_H] @ [BLOCK_M, BLOCK_H, BLOCK_N]
            w3 = tl.broadcast_to(wbt[None, :, :], (BLOCK_M, OUT_H, BLOCK_H))
            mix = tl.dot(w3, tl.permute(a, (1, 0, 2)), input_precision="ieee")
            out += tl.permute(mix, (1, 0, 2))
        else:
            out += tl.sum(a[None, :, :, :] * wbt[:, :, None, None], axis=1)
    return out


@triton.jit
def _block_logits(
    q_base,
    k_base,
    qf_ptr,
    kf_ptr,
    kpm_ptr,
    wb_ptr,
    am_ptr,
    am_strides,
    b,
    S,
    cols,
    rows,
    row_ok,
    t_abs,
    q_tok,
    k_tok_base,
    heads,
    head_ok,
    dk,
    SCALE: tl.constexpr,
    CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,
    USE_STATIC_MIX: tl.constexpr,
    HAS_MASK: tl.constexpr,
    N: tl.constexpr,
    D: tl.constexpr,
    R: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Scaled, pre-composed, masked logits [BLOCK_H, BLOCK_M, BLOCK_N] of all heads for the key
    block ``cols``: what both passes recompute. Also returns the block's key validity and
    key-factor offsets."""
    F: tl.constexpr = 2 * R + 1
    col_ok = cols < S
    logits = tl.zeros([BLOCK_H, BLOCK_M, BLOCK_N], tl.float32)
    for d0 in tl.range(0, D, BLOCK_DK):
        dd = d0 + dk
        qc = tl.load(
            q_base + (rows[None, :, None] * N + heads[:, None, None]) * D + dd[None, None, :],
            mask=head_ok[:, None, None] & row_ok[None, :, None] & (dd < D)[None, None, :],
            other=0.0,
        )
        kc = tl.load(
            k_base + (cols[None, None, :] * N + heads[:, None, None]) * D + dd[None, :, None],
            mask=head_ok[:, None, None] & col_ok[None, None, :] & (dd < D)[None, :, None],
            other=0.0,
        )
        logits = tl.dot(qc, kc, logits, input_precision=DOT_PRECISION)
    logits = logits * SCALE
    k_tok = k_tok_base + cols * (2 * F * N)
    logits = _compose(
        logits,
        logits,
        qf_ptr,
        q_tok,
        row_ok,
        kf_ptr,
        k_tok,
        col_ok,
        wb_ptr,
        heads,
        heads,
        N,
        R,
        BLOCK_H,
        BLOCK_H,
        BLOCK_M,
        BLOCK_N,
        USE_STATIC_MIX,
    )
    allowed = tl.load(kpm_ptr + b * S + cols, mask=col_ok, other=0).to(tl.int1)[None, :]
    if CAUSAL:
        allowed = allowed & (cols[None, :] <= t_abs[:, None])
    if WINDOW > 0:
        allowed = allowed & (t_abs[:, None] - cols[None, :] < WINDOW)
    allowed = tl.broadcast_to(allowed[None, :, :], (BLOCK_H, BLOCK_M, BLOCK_N))
    if HAS_MASK:  # attn_mask element (b, head, row, col); strides (batch, head, row, col), 0 = broadcast
        sb, sn, st, ss = am_strides
        am = tl.load(
            am_ptr + b * sb + heads[:, None, None] * sn + rows[None, :, None] * st + cols[None, None, :] * ss,
            mask=head_ok[:, None, None] & row_ok[None, :, None] & col_ok[None, None, :],
            other=0,
        )
        allowed = allowed & (am != 0)
    logits = tl.where(allowed, logits, -1e30)  # NEG
    return cols, col_ok, k_tok, logits


@triton.jit
def dcmha_attention_fwd(
    q_ptr,
    k_ptr,
    v_ptr,
    qf_ptr,
    kf_ptr,
    kpm_ptr,
    wb_ptr,
    am_ptr,  # inputs (am_ptr: attn_mask, used when HAS_MASK)
    T,
    S,
    am_sb,
    am_sn,
    am_st,
    am_ss,  # int32 scalars: T, S and attn_mask's strides over (batch, head, row, key)
    o_ptr,  # output
    SCALE: tl.constexpr,
    CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,
    USE_STATIC_MIX: tl.constexpr,
    HAS_MASK: tl.constexpr,
    N: tl.constexpr,
    D: tl.constexpr,
    R: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEADS_PER_PROGRAM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid (cdiv(T, BLOCK_M), B, BLOCK_H // HEADS_PER_PROGRAM); see the module docstring."""
    NEG_: tl.constexpr = -1e30
    F: tl.constexpr = 2 * R + 1  # factor rows per slot
    GROUPS: tl.constexpr = BLOCK_H // HEADS_PER_PROGRAM
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    group = tl.program_id(2)

    heads = tl.arange(0, BLOCK_H)
    out_heads = group * HEADS_PER_PROGRAM + tl.arange(0, HEADS_PER_PROGRAM)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query index t
    row_ok = rows < T
    cols0 = tl.arange(0, BLOCK_N)
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_D)
    head_ok = heads < N

    q_base = q_ptr + b * T * N * D
    k_base = k_ptr + b * S * N * D
    v_base = v_ptr + b * S * N * D
    # query factors: [B, T, 2, F, N]; slot 0 = pre, slot 1 = post
    q_tok = (b * T + rows) * (2 * F * N)
    k_tok_base = b * S * (2 * F * N)
    t_abs = rows + (S - T)  # causal alignment to the key end

    # key blocks that causal / window leave any allowed key in, for this query block
    lo = 0
    hi = S
    if CAUSAL:
        hi = tl.minimum(S, pid_m * BLOCK_M + BLOCK_M + S - T)
        hi = tl.maximum(hi, 0)
    if WINDOW > 0:
        lo = tl.maximum(0, pid_m * BLOCK_M + S - T - WINDOW + 1)
        lo = (lo // BLOCK_N) * BLOCK_N

    # ---------------- pass 1: row max and row sum of the pre-composed, masked logits -------
    m_i = tl.full([BLOCK_H, BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H, BLOCK_M], tl.float32)
    for start_n in tl.range(lo, hi, BLOCK_N):
        cols, col_ok, k_tok, logits = _block_logits(
            q_base,
            k_base,
            qf_ptr,
            kf_ptr,
            kpm_ptr,
            wb_ptr,
            am_ptr,
            (am_sb, am_sn, am_st, am_ss),
            b,
            S,
            start_n + cols0,
            rows,
            row_ok,
            t_abs,
            q_tok,
            k_tok_base,
            heads,
            head_ok,
            dk,
            SCALE,
            CAUSAL,
            WINDOW,
            USE_STATIC_MIX,
            HAS_MASK,
            N,
            D,
            R,
            BLOCK_H,
            BLOCK_M,
            BLOCK_N,
            BLOCK_DK,
            DOT_PRECISION,
        )
        logits = tl.where(col_ok[None, None, :], logits, float("-inf"))  # outside the S keys
        m_new = tl.maximum(m_i, tl.max(logits, axis=2))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(logits - m_new[:, :, None]), axis=2)
        m_i = m_new

    # Rows with no allowed key: every logit is NEG, P is uniform over all S keys. Sweep every
    # key block in pass 2 when the query block holds such a row (left padding, T > S, ...).
    empty = m_i < NEG_ * 0.5
    m_i = tl.where(empty, NEG_, m_i)
    l_i = tl.where(empty, S + 0.0, l_i)
    any_empty = tl.max(tl.max((empty & row_ok[None, :]).to(tl.int32), axis=1), axis=0)
    lo2 = tl.where(any_empty > 0, 0, lo)
    hi2 = tl.where(any_empty > 0, S, hi)
    inv_l = 1.0 / l_i

    # ---------------- pass 2: normalise, post-compose, accumulate P' v ---------------------
    acc = tl.zeros([HEADS_PER_PROGRAM, BLOCK_M, BLOCK_D], tl.float32)
    for start_n in tl.range(lo2, hi2, BLOCK_N):
        cols, col_ok, k_tok, logits = _block_logits(
            q_base,
            k_base,
            qf_ptr,
            kf_ptr,
            kpm_ptr,
            wb_ptr,
            am_ptr,
            (am_sb, am_sn, am_st, am_ss),
            b,
            S,
            start_n + cols0,
            rows,
            row_ok,
            t_abs,
            q_tok,
            k_tok_base,
            heads,
            head_ok,
            dk,
            SCALE,
            CAUSAL,
            WINDOW,
            USE_STATIC_MIX,
            HAS_MASK,
            N,
            D,
            R,
            BLOCK_H,
            BLOCK_M,
            BLOCK_N,
            BLOCK_DK,
            DOT_PRECISION,
        )
        logits = tl.where(col_ok[None, None, :], logits, float("-inf"))
        p = tl.exp(logits - m_i[:, :, None]) * inv_l[:, :, None]  # [BLOCK_H, BLOCK_M, BLOCK_N]
        if GROUPS == 1:
            p_self = p
        else:  # the output heads' own probabilities: select head group `group`
            p4 = tl.reshape(p, (GROUPS, HEADS_PER_PROGRAM, BLOCK_M, BLOCK_N))
            gsel = tl.arange(0, GROUPS)[:, None, None, None] == group
            p_self = tl.sum(tl.where(gsel, p4, 0.0), axis=0)
        p_out = _compose(
            p,
            p_self,
            qf_ptr,
            q_tok + F * N,
            row_ok,
            kf_ptr,
            k_tok + F * N,
            col_ok,
            wb_ptr + N * N,
            heads,
            out_heads,
            N,
            R,
            BLOCK_H,
            HEADS_PER_PROGRAM,
            BLOCK_M,
            BLOCK_N,
            USE_STATIC_MIX,
        )
        vt = tl.load(
            v_base + (cols[None, :, None] * N + out_heads[:, None, None]) * D + dv[None, None, :],
            mask=(out_heads < N)[:, None, None] & col_ok[None, :, None] & (dv < D)[None, None, :],
            other=0.0,
        )
        acc = tl.dot(p_out.to(vt.dtype), vt, acc, input_precision=DOT_PRECISION)

    o_ptrs = o_ptr + ((b * T + rows[None, :, None]) * N + out_heads[:, None, None]) * D + dv[None, None, :]
    o_mask = (out_heads < N)[:, None, None] & row_ok[None, :, None] & (dv < D)[None, None, :]
    tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=o_mask)


# ------------------------------------------------------------------------------------------
# launch configuration, shared by the torch dispatch and the TensorRT plugin
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelConfig:
    """Compile-time constants of one specialisation (everything but the pointers, T and S)."""

    scale: float
    causal: bool
    window: int
    use_static_mix: bool
    heads: int
    head_dim: int
    rank: int
    block_m: int = 16
    block_n: int = 16
    block_dk: int = 16
    heads_per_program: int = 0  # 0 = choose (see :func:`default_heads_per_program`)
    has_mask: bool = False  # an attn_mask input (never for the TensorRT plugin)
    num_warps: int = 4
    num_stages: int = 1
    dot_precision: str = "ieee"

    @property
    def block_h(self) -> int:
        return triton.next_power_of_2(self.heads)

    @property
    def block_d(self) -> int:
        return max(16, triton.next_power_of_2(self.head_dim))

    @property
    def hpp(self) -> int:
        return self.heads_per_program or default_heads_per_program(self.heads, self.head_dim, self.block_m)

    @property
    def head_groups(self) -> int:
        return self.block_h // self.hpp

    def constexprs(self) -> dict[str, Any]:
        return {
            "SCALE": float(self.scale),
            "CAUSAL": int(bool(self.causal)),
            "WINDOW": int(self.window),
            "USE_STATIC_MIX": int(bool(self.use_static_mix)),
            "HAS_MASK": int(bool(self.has_mask)),
            "N": self.heads,
            "D": self.head_dim,
            "R": self.rank,
            "BLOCK_H": self.block_h,
            "BLOCK_D": self.block_d,
            "BLOCK_DK": self.block_dk,
            "BLOCK_M": self.block_m,
            "BLOCK_N": self.block_n,
            "HEADS_PER_PROGRAM": self.hpp,
            "DOT_PRECISION": self.dot_precision,
        }

    def grid(self, batch: int, q_len: int) -> tuple[int, int, int]:
        return (triton.cdiv(q_len, self.block_m), batch, self.head_groups)


# fp32 elements of one program's output accumulator [heads, BLOCK_M, BLOCK_D] we allow
ACC_BUDGET = 16384


def default_heads_per_program(heads: int, head_dim: int, block_m: int) -> int:
    """Largest power-of-two head group whose fp32 accumulator fits :data:`ACC_BUDGET`."""
    block_h = triton.next_power_of_2(heads)
    block_d = max(16, triton.next_power_of_2(head_dim))
    hpp = block_h
    while hpp > 1 and hpp * block_m * block_d > ACC_BUDGET:
        hpp //= 2
    return hpp


def resolve_scale(scale: float, head_dim: int) -> float:
    """``scale`` attribute: 0.0 means 1/sqrt(d)."""
    return float(scale) if scale else 1.0 / math.sqrt(head_dim)


def check_window(causal: bool, window: int) -> None:
    if window < 0:
        raise ValueError(f"dcmha_attention: window must be >= 0, got {window}")
    if window and not causal:
        raise ValueError("dcmha_attention: a local window requires causal=True")


def config_for(
    heads: int,
    head_dim: int,
    rank: int,
    dtype: str,
    scale: float,
    causal: bool,
    window: int,
    use_static_mix: bool,
    **overrides: Any,
) -> KernelConfig:
    """The launch configuration for one op instance (``dtype``: float32, float16 or bfloat16).

    Shared by the torch dispatch and the TensorRT plugin, so both run the same specialisation.
    """
    check_window(bool(causal), int(window))
    base: dict[str, Any] = dict(
        scale=resolve_scale(scale, head_dim),
        causal=bool(causal),
        window=int(window),
        use_static_mix=bool(use_static_mix),
        heads=int(heads),
        head_dim=int(head_dim),
        rank=int(rank),
        dot_precision="ieee" if dtype == "float32" else "tf32",
    )
    if heads * head_dim >= 2048:  # the published sizes: more warps for the big head tile
        base["num_warps"] = 8
    base.update(overrides)
    return KernelConfig(**base)


def make_config(
    q: torch.Tensor,
    q_factors: torch.Tensor,
    scale: float,
    causal: bool,
    window: int,
    use_static_mix: bool,
    **overrides: Any,
) -> KernelConfig:
    _, _, heads, head_dim = q.shape
    rank = (q_factors.shape[3] - 1) // 2
    dtype = str(q.dtype).removeprefix("torch.")
    return config_for(heads, head_dim, rank, dtype, scale, causal, window, use_static_mix, **overrides)


def _is_interpreted(kernel: Any) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def mask_strides(attn_mask: torch.Tensor | None, b: int, n: int, t: int, s: int) -> tuple[int, int, int, int]:
    """attn_mask's element strides over (batch, head, row, key), 0 on broadcast axes (a [T,S]
    mask is [1,1,T,S]); zeros without a mask. The mask must be contiguous."""
    if attn_mask is None:
        return (0, 0, 0, 0)
    from .reference import check_attn_mask

    check_attn_mask(attn_mask, b, n, t, s)
    full = attn_mask[None, None] if attn_mask.dim() == 2 else attn_mask
    return tuple(0 if size == 1 else stride for size, stride in zip(full.shape, full.stride()))


def _check_inputs(q, k, v, q_factors, k_factors, key_padding_mask, static_mix) -> None:
    B, T, N, d = q.shape
    S = k.shape[1]
    if k.shape != (B, S, N, d) or v.shape != (B, S, N, d):
        raise ValueError(f"dcmha_attention: k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    F = q_factors.shape[3]
    if q_factors.shape != (B, T, 2, F, N) or F % 2 != 1:
        raise ValueError(f"dcmha_attention: q_factors must be [B,T,2,2R+1,N], got {tuple(q_factors.shape)}")
    if k_factors.shape != (B, S, 2, F, N):
        raise ValueError(f"dcmha_attention: k_factors must be [B,S,2,2R+1,N], got {tuple(k_factors.shape)}")
    if key_padding_mask.shape != (B, S) or key_padding_mask.dtype != torch.bool:
        raise ValueError("dcmha_attention: key_padding_mask must be a bool [B,S] tensor")
    if static_mix.shape != (2, N, N):
        raise ValueError(f"dcmha_attention: static_mix must be [2,N,N], got {tuple(static_mix.shape)}")


def dcmha_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_factors: torch.Tensor,
    k_factors: torch.Tensor,
    key_padding_mask: torch.Tensor,
    static_mix: torch.Tensor,
    scale: float,
    causal: bool,
    window: int,
    use_static_mix: bool,
    attn_mask: torch.Tensor | None = None,
    **config: Any,
) -> torch.Tensor:
    """The fused kernel, same signature and result as ``torch.ops.attn2onnx.dcmha_attention``.

    CUDA tensors run the compiled kernel; CPU tensors run it under Triton's interpreter (slow:
    for tests at small shapes). ``config`` overrides :class:`KernelConfig` fields.
    """
    _check_inputs(q, k, v, q_factors, k_factors, key_padding_mask, static_mix)
    B, T, N, d = q.shape
    S = k.shape[1]
    cfg = make_config(q, q_factors, scale, causal, window, use_static_mix, has_mask=attn_mask is not None, **config)
    attn_mask = None if attn_mask is None else attn_mask.contiguous()
    strides = mask_strides(attn_mask, B, N, T, S)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"dcmha_attention_triton: q must be float32, float16 or bfloat16, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError("dcmha_attention_triton: q, k and v must have one dtype")
    # factors and the static mix keep their own float dtype: the kernel converts them on load
    q_factors, k_factors = q_factors.contiguous(), k_factors.contiguous()
    static_mix = static_mix.contiguous()
    key_padding_mask = key_padding_mask.contiguous()
    out = torch.empty_like(q)
    if B == 0 or T == 0 or out.numel() == 0:
        return out
    if S == 0:
        return out.zero_()
    if not q.is_cuda and not _is_interpreted(dcmha_attention_fwd):
        raise RuntimeError(
            "dcmha_attention_triton: CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 "
            "before triton is first imported"
        )
    dcmha_attention_fwd[cfg.grid(B, T)](
        q,
        k,
        v,
        q_factors,
        k_factors,
        key_padding_mask,
        static_mix,
        attn_mask,
        T,
        S,
        *strides,
        out,
        **cfg.constexprs(),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out


_REGISTERED = False


def register_cuda_kernel() -> bool:
    """Make the fused kernel the CUDA implementation of ``attn2onnx::dcmha_attention``.

    Returns False (and does nothing) while the op is not defined yet. Idempotent.
    """
    global _REGISTERED
    if _REGISTERED:
        return True
    namespace, name = TORCH_OP.split("::")
    if not hasattr(getattr(torch.ops, namespace), name):
        return False

    def cuda_impl(
        q,
        k,
        v,
        q_factors,
        k_factors,
        key_padding_mask,
        static_mix,
        scale,
        causal,
        window,
        use_static_mix,
        attn_mask=None,
    ):
        args = (q, k, v, q_factors, k_factors, key_padding_mask, static_mix, scale, causal, window, use_static_mix)
        if q.dtype not in SUPPORTED_DTYPES:  # float64 and friends: the eager reference
            from .reference import dcmha_attention_reference

            return dcmha_attention_reference(*args, attn_mask).contiguous()
        return dcmha_attention_triton(*args, attn_mask)

    torch.library.register_kernel(TORCH_OP, "cuda", cuda_impl)
    _REGISTERED = True
    return True


__all__ = [
    "KERNEL_NAME",
    "KernelConfig",
    "config_for",
    "dcmha_attention_fwd",
    "dcmha_attention_triton",
    "default_heads_per_program",
    "make_config",
    "register_cuda_kernel",
    "resolve_scale",
]

# Importing this module after the op is defined (custom_ops/dcmha_attention/__init__.py) is enough.
register_cuda_kernel()
