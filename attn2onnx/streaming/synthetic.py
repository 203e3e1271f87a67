"""DCFormer-release folders of the published sizes with random weights, written streaming.

The release (Caiyun-AI/DCFormer, ``pytorch/dcformer``) stores ``config.json`` (``DCFormerConfig``
fields) and safetensors shards. :func:`write_release_checkpoint` writes such a folder for a
config without ever holding more than one tensor: the safetensors header is computed from the
shapes first, then each tensor is drawn and appended, so a 6.9B folder (13.8 GB in bf16) is
written on a machine with less memory than that.

The published shapes (checked against the release repository):

* ``2.8b``: DCFormer++-2.8B, ``jax/MaxText/configs/dcformer_pp_2b8.yml``: 32 layers of width
  2560, 32 heads (head_dim 80, as DCFormerConfig computes dim // n_head), MLP 6912 (also
  DCFormerConfig's default for dim 2560), windows [256, null] (the default LG pattern), no QK
  norm ("2b8 model use false"), the Pile's GPT-NeoX vocabulary of 50257;
* ``6.9b``: DCPythia-6.9B's dims (``pytorch/dcpythia/config.json``: width 4096, 32 layers, 32
  heads, QK norm, window 256, block 2048, vocabulary 50257, rope_base 10000) in the DCFormer
  layout, whose SwiGLU MLP replaces Pythia's GeLU MLP of 16384 by 11008 (2/3 of it, rounded
  to 256: the same parameter count, 6.9B).
"""

from __future__ import annotations

import json
import math
import os
import zlib
from pathlib import Path
from typing import Any, Iterator

import torch

PRESETS: dict[str, dict[str, Any]] = {
    "2.8b": dict(
        block_size=2048,
        vocab_size=50257,
        n_layer=32,
        n_head=32,
        dim=2560,
        intermediate_size=6912,
        n_local_heads=32,
        rope_base=10000.0,
        norm_eps=1e-5,
        use_qk_norm=False,
        window_size=256,
        window_type=None,
    ),
    "6.9b": dict(
        block_size=2048,
        vocab_size=50257,
        n_layer=32,
        n_head=32,
        dim=4096,
        intermediate_size=11008,
        n_local_heads=32,
        rope_base=10000.0,
        norm_eps=1e-5,
        use_qk_norm=True,
        window_size=256,
        window_type=None,
    ),
}
DTYPES = {"bf16": (torch.bfloat16, "BF16"), "fp16": (torch.float16, "F16"), "fp32": (torch.float32, "F32")}
SHARD_BYTES = 2 * 10**9  # Hugging Face writes shards of at most a few GB; 2 GB keeps each mmap small
_META = {"architectures": ["DCFormer"], "model_type": "dcformer", "is_training": False, "use_dcmha": True}


def scaled(config: dict[str, Any], width: float = 1.0, layers: int | None = None) -> dict[str, Any]:
    """``config`` with its width (dim, MLP) times ``width`` (dim a multiple of 2 * n_head, so the
    head dim stays even for RoPE; MLP a multiple of 256) and ``layers`` layers: the CI-sized
    versions of a published config, with its vocabulary, heads and options."""
    out = dict(config)
    step = 2 * config["n_head"]
    out["dim"] = max(step, round(config["dim"] * width / step) * step)
    out["intermediate_size"] = max(256, round(config["intermediate_size"] * width / 256) * 256)
    if layers is not None:
        out["n_layer"] = layers
    return out


def release_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of the release's checkpoint for ``config`` (DCFormerConfig's fields) and its
    shape: fused ``wqkv``, the grouped dynamic-weight layout, the static-mix buffers."""
    D, N, L, V = config["dim"], config["n_head"], config["n_layer"], config["vocab_size"]
    kv = config.get("n_local_heads", -1)
    kv = N if kv == -1 else kv
    H = config["intermediate_size"]
    d, K, R = D // N, 4 * N, N // (N // 2)
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (V, D)}
    for i in range(L):
        p = f"layers.{i}."
        a = p + "attention."
        shapes.update(
            {
                a + "wqkv.weight": ((N + 2 * kv) * d, D),
                a + "wo.weight": (D, D),
                a + "dyn_w_proj.dw1": (D, 1, 4, K),
                a + "dyn_w_proj.qkw": (1, 4, K, 2 * R, N),
                a + "dyn_w_proj.dd": (D, 1, 4 * N),
                a + "dyn_w_proj.pre_proj.w": (1, N, N),
                a + "dyn_w_proj.post_proj.w": (1, N, N),
                p + "feed_forward.w1.weight": (H, D),
                p + "feed_forward.w3.weight": (H, D),
                p + "feed_forward.w2.weight": (D, H),
                p + "attention_norm.weight": (D,),
                p + "ffn_norm.weight": (D,),
            }
        )
        if config.get("use_qk_norm"):
            shapes[a + "q_norm.scale"] = (d,)
            shapes[a + "k_norm.scale"] = (d,)
    shapes["norm.weight"] = (D,)
    shapes["output.weight"] = (V, D)
    return shapes


def parameter_count(config: dict[str, Any]) -> int:
    """Numbers in the checkpoint of ``config``."""
    return sum(math.prod(shape) for shape in release_shapes(config).values())


def random_tensor(key: str, shape: tuple[int, ...], n_head: int) -> torch.Tensor:
    """A float32 tensor for ``key``, the same for the same key and shape on every run (seeded by
    the key): norms near 1, static mixes the identity (use_sw off), matrices scaled by their
    fan-in so activations stay O(1) through every layer, in fp16 as well."""
    if key.endswith("_proj.w"):
        return torch.eye(n_head)[None]
    gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    if len(shape) == 1:
        return 1 + 0.1 * torch.randn(shape, generator=gen)
    fan_in = shape[0] if "dyn_w_proj" in key else shape[-1]
    scale = 0.3 if key.endswith(("qkw", "dd")) else 0.5
    return torch.randn(shape, generator=gen).mul_(scale / math.sqrt(fan_in))


def _shards(shapes: dict[str, tuple[int, ...]], itemsize: int, shard_bytes: int) -> list[list[str]]:
    """Keys split in order into shards of at most ``shard_bytes`` (a larger tensor alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, shape in shapes.items():
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def _header(keys: list[str], shapes: dict[str, tuple[int, ...]], itemsize: int, tag: str) -> bytes:
    """The safetensors header for ``keys`` laid out in order: 8-byte length, then JSON padded to
    8 bytes with spaces (as the format allows)."""
    entries: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key in keys:
        end = offset + math.prod(shapes[key]) * itemsize
        entries[key] = {"dtype": tag, "shape": list(shapes[key]), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def _raw(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes (any dtype, bf16 included) without another copy."""
    return memoryview(tensor.contiguous().view(torch.uint8).numpy())


def write_release_checkpoint(
    folder: str | Path,
    config: dict[str, Any],
    dtype: str = "bf16",
    shard_bytes: int = SHARD_BYTES,
    values: bool = True,
) -> Iterator[tuple[str, int]]:
    """Write ``config.json`` and safetensors shards of random weights (``dtype``) into
    ``folder``, one tensor in memory at a time; yields (shard file, bytes) as each shard is done.
    Several shards get ``model.safetensors.index.json`` (Hugging Face's weight map).
    ``values=False`` leaves every weight a hole (a sparse file of the full size, zeros, no disk
    used) but the static head mixes (the identity, as the release stores them without use_sw):
    a valid checkpoint of zero weights, whose sizes, memory and speed are real (its tokens not)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch_dtype, tag = DTYPES[dtype]
    itemsize = torch.tensor([], dtype=torch_dtype).element_size()
    shapes = release_shapes(config)
    shards = _shards(shapes, itemsize, shard_bytes)
    torch_name = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]
    (folder / "config.json").write_text(json.dumps({**_META, **config, "torch_dtype": torch_name}, indent=2) + "\n")
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map = {}
    for name, keys in zip(names, shards):
        with open(folder / name, "wb") as f:
            f.write(_header(keys, shapes, itemsize, tag))
            for key in keys:
                weight_map[key] = name
                if not values and not key.endswith("_proj.w"):
                    f.seek(math.prod(shapes[key]) * itemsize, os.SEEK_CUR)  # a hole: zeros
                    continue
                tensor = random_tensor(key, shapes[key], config["n_head"]).to(torch_dtype)
                f.write(_raw(tensor))
                del tensor
            f.truncate(f.tell())  # a trailing hole still counts in the size
        yield name, (folder / name).stat().st_size
    if len(shards) > 1:
        total = sum(math.prod(s) * itemsize for s in shapes.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


__all__ = ["PRESETS", "parameter_count", "release_shapes", "scaled", "write_release_checkpoint"]
