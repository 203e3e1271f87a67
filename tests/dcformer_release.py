"""The DCFormer PyTorch release's checkpoint layout and forward, re-implemented here for tests.

Written from what ``pytorch/dcformer/modeling_dcformer.py`` of the Caiyun-AI/DCFormer repository
computes on a full sequence (``DCFormer.forward`` on a prompt, its prefill path), independently
of attn2onnx's model code (only the checkpoint's shape table is shared, with
attn2onnx.streaming.synthetic): float64 throughout, the release's own tensor layouts
(fused ``wqkv``, grouped ``dw1`` [D,1,4,K] / ``qkw`` [1,4,K,2I,N] / ``dd`` [D,1,4N], static mix
as ``pre_proj.w`` / ``post_proj.w`` [1,N,N]), its W + 1-key window mask, float16 RoPE table and
``finfo(float16).min`` mask fill.

``write_release_folder`` writes a small random checkpoint folder in the release's layout
(config.json + model.safetensors or pytorch_model.bin); ``release_forward`` computes its logits.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

DEFAULTS = dict(
    block_size=2048,
    vocab_size=32000,
    n_layer=32,
    n_head=32,
    dim=2560,
    intermediate_size=None,
    n_local_heads=-1,
    rope_base=500000.0,
    norm_eps=1e-5,
    use_qk_norm=False,
    window_size=256,
    window_type=None,
    query_wise=False,
    use_sw=False,
)
PATTERNS = {None: [256, None], "LG": [256, None], "LGLL": [256, None, 256, 256], "LGL6": [256, None] + [256] * 6}


def full_config(config: dict[str, Any]) -> dict[str, Any]:
    """The release's DCFormerConfig defaults and post-init fill-ins applied to ``config``."""
    c = {**DEFAULTS, **config}
    if c["n_local_heads"] == -1:
        c["n_local_heads"] = c["n_head"]
    if c["intermediate_size"] is None:
        n_hidden = int(2 * (4 * c["dim"]) / 3)
        c["intermediate_size"] = n_hidden if n_hidden % 256 == 0 else n_hidden + 256 - n_hidden % 256
    return c


def release_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of the release's model for ``config`` and its shape: the table of
    :func:`attn2onnx.streaming.synthetic.release_shapes` (one source; the importer checks it
    against the release's layout), in this module's order (embedding, final norm and head
    first: the order random_release_state draws in)."""
    from attn2onnx.streaming.synthetic import release_shapes as shapes_of

    shapes = shapes_of(full_config(config))
    first = ("tok_embeddings.weight", "norm.weight", "output.weight")
    return {**{key: shapes[key] for key in first}, **shapes}


def random_release_state(config: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the release's layout, scaled so every term (head composition included)
    moves the logits while float32 rounding stays near 1e-6 on them (logits O(0.5));
    pre_proj.w / post_proj.w hold the identity unless use_sw. With query_wise the key-side
    dynamic weights are zero (what a query-wise model has)."""
    c = full_config(config)
    N = c["n_head"]
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in release_shapes(config).items():
        if key.endswith("_proj.w"):
            value = torch.eye(N)[None] + (0.3 * torch.randn(shape, generator=gen) if c["use_sw"] else 0)
        elif len(shape) == 1:
            value = 1 + 0.2 * torch.randn(shape, generator=gen)
        else:
            fan_in = shape[0] if "dyn_w_proj" in key else shape[-1]
            scale = 0.5 if key.endswith(("qkw", "dd")) else 0.2 if key == "output.weight" else 0.5
            value = scale * torch.randn(shape, generator=gen) / math.sqrt(fan_in)
        state[key] = value.to(torch.float32)
    if c["query_wise"]:
        for i in range(c["n_layer"]):
            p = f"layers.{i}.attention.dyn_w_proj."
            state[p + "qkw"][:, [1, 3]] = 0
            state[p + "dd"].view(c["dim"], 1, 4, N)[:, :, [1, 3]] = 0
    return state


def write_release_folder(
    folder: Path,
    config: dict[str, Any],
    state: dict[str, torch.Tensor] | None = None,
    fmt: str = "safetensors",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """config.json (the given keys, plus the Hugging Face bookkeeping the release writes) and the
    weights (``fmt``: safetensors or bin) in ``folder``; returns the state written."""
    folder.mkdir(parents=True, exist_ok=True)
    state = random_release_state(config, seed) if state is None else state
    meta = {"architectures": ["DCFormer"], "model_type": "dcformer", "torch_dtype": "float32", "is_training": False}
    (folder / "config.json").write_text(json.dumps({**meta, **config}, indent=2))
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    else:
        torch.save(state, folder / "pytorch_model.bin")
    return state


def _rms(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return x if weight is None else x * weight


def _rope(x: torch.Tensor, base: float, length: int) -> torch.Tensor:
    """x [B,T,H,d]; the release's table: float32 angles, cos / sin stored in float16; pairs
    (i, i + d/2) rotated."""
    d = x.shape[-1]
    freqs = 1.0 / (base ** (torch.arange(0, d, 2)[: d // 2].float() / d))
    angles = torch.outer(torch.arange(length).float(), freqs)
    cos = torch.cos(angles).half().double()[None, :, None, :]
    sin = torch.sin(angles).half().double()[None, :, None, :]
    a, b = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def _compose(
    a: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, gate: torch.Tensor, sw: torch.Tensor | None, side: int
) -> torch.Tensor:
    """Cross-head projection of a [B,N,T,S] with one side's factors (side 0 query: factors of t,
    side 1 key: factors of s). w1/w2 [B,P,I,N], gate [B,P,N]."""
    out = torch.zeros_like(a) if sw is None else torch.einsum("bmts,mn->bnts", a, sw)
    if side == 0:
        hidden = torch.einsum("bmts,btim->bits", a, w1)
        out = out + torch.einsum("bits,btin->bnts", hidden, w2) + a * gate.transpose(1, 2)[..., None]
    else:
        hidden = torch.einsum("bmts,bsim->bits", a, w1)
        out = out + torch.einsum("bits,bsin->bnts", hidden, w2) + a * gate.transpose(1, 2)[:, :, None, :]
    return out


def _attention(h: torch.Tensor, sd: dict[str, torch.Tensor], p: str, c: dict[str, Any], local: bool) -> torch.Tensor:
    B, T, D = h.shape
    N, L = c["n_head"], c["n_local_heads"]
    d, I = D // N, N // (N // 2)
    q, k, v = (h @ sd[p + "wqkv.weight"].T).split([D, L * d, L * d], dim=-1)
    q, k, v = q.view(B, T, N, d), k.view(B, T, L, d), v.view(B, T, L, d)
    if c["use_qk_norm"]:
        q, k = _rms(q, sd[p + "q_norm.scale"], 1e-6), _rms(k, sd[p + "k_norm.scale"], 1e-6)
    q, k = _rope(q, c["rope_base"], T), _rope(k, c["rope_base"], T)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B,heads,T,d]; L = 1 broadcasts
    logits = q @ k.transpose(-2, -1) / math.sqrt(d)
    dyn = p + "dyn_w_proj."
    hidden = F.gelu(torch.einsum("btd,dck->btck", h, sd[dyn + "dw1"][:, 0]))
    w = torch.einsum("btck,ckjn->btcjn", hidden, sd[dyn + "qkw"][0])
    w1, w2 = w[:, :, :, :I], w[:, :, :, I:]
    w1 = _rms(w1, None, 1e-6)
    gates = torch.tanh(h @ sd[dyn + "dd"][:, 0]).view(B, T, 4, N)
    sws = [sd[dyn + "pre_proj.w"][0], sd[dyn + "post_proj.w"][0]] if c["use_sw"] else [None, None]

    def mix(a: torch.Tensor, slot: int, sw: torch.Tensor | None) -> torch.Tensor:
        query = _compose(a, w1[:, :, slot], w2[:, :, slot], gates[:, :, slot], sw, 0)
        key = _compose(a, w1[:, :, slot + 1], w2[:, :, slot + 1], gates[:, :, slot + 1], None, 1)
        return a + query + key

    rows, cols = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = cols <= rows
    if local:
        allowed = allowed & (cols + c["window_size"] >= rows)
    logits = torch.where(allowed, mix(logits, 0, sws[0]), torch.finfo(torch.float16).min)
    probs = mix(logits.softmax(-1), 2, sws[1])
    y = (probs @ v).transpose(1, 2).reshape(B, T, D)
    return y @ sd[p + "wo.weight"].T


def release_forward(config: dict[str, Any], state: dict[str, torch.Tensor], input_ids: torch.Tensor) -> torch.Tensor:
    """Logits [B,T,V] (float64) of the release's model for ``config`` and ``state`` (fused wqkv)."""
    c = full_config(config)
    sd = {k: v.double() for k, v in state.items()}
    eps = c["norm_eps"]
    pattern = PATTERNS[c["window_type"]]
    x = sd["tok_embeddings.weight"][input_ids]
    for i in range(c["n_layer"]):
        p = f"layers.{i}."
        local = c["window_size"] is not None and pattern[i % len(pattern)] is not None
        x = x + _attention(_rms(x, sd[p + "attention_norm.weight"], eps), sd, p + "attention.", c, local)
        f = _rms(x, sd[p + "ffn_norm.weight"], eps)
        fw = p + "feed_forward."
        x = x + (F.silu(f @ sd[fw + "w1.weight"].T) * (f @ sd[fw + "w3.weight"].T)) @ sd[fw + "w2.weight"].T
    return _rms(x, sd["norm.weight"], eps) @ sd["output.weight"].T
