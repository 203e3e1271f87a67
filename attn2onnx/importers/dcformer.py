"""Import checkpoints of the DCFormer PyTorch release onto the dcmha causal LM.

The release (the Caiyun-AI/DCFormer repository, ``pytorch/dcformer``: ``modeling_dcformer.py``,
``configuration_dcformer.py``; the layout of DCFormer-2.8B and DCPythia-6.9B's DCFormer port)
is a folder holding ``config.json`` (``DCFormerConfig`` fields) and the weights as safetensors
(``model.safetensors`` or shards) or a torch ``pytorch_model*.bin``. :func:`import_dcformer`
reads both without running code (safetensors, or the weights-only torch loader) and returns
a :class:`~attn2onnx.models.lm.CausalLM` of variant ``dcmha`` computing what the release's
full-sequence forward computes (``DCFormer.forward`` on a prompt: its prefill path), in float32.

Where the release computes something variants.md does not say, the import follows the release:
- A local layer keeps W + 1 keys (``make_window_mask``: 0 <= t - s <= W; its JAX code keeps W):
  dcmha option ``window_plus_one``. Which layers are local: the ``window_type`` pattern
  (LG, LGLL, LGL6; none: even layers) repeated over the layers; W is ``window_size`` (the
  pattern's hard-coded 256 only sizes the release's decode cache); ``window_size`` null: every
  layer is global.
- RoPE's cos / sin are cached in float16 (``precompute_freqs_cis``): ``rope_fp16_table``.
- Masked logits are filled with ``finfo(float16).min`` instead of NEG: this changes nothing,
  since every query keeps its own key, and both fills give exactly 0 after the softmax.
- ``n_local_heads``: the number of K/V heads, broadcast over the query heads, so the release
  runs only n_head (multi-head) or 1 (multi-query): ``kv_heads``.
- ``query_wise`` is honoured only by the release's one-token decode, which drops the key-side
  dynamic weights; its full-sequence forward uses them. A query_wise checkpoint is imported only
  when those weights are zero (both paths then agree); otherwise it is an error.
- ``use_sw`` (static head mix, ``pre_proj.w`` / ``post_proj.w``): ``static_mix``. Without it the
  release ignores those buffers, so they must hold the identity it initialises them with.
- ``dw_m``, ``qkw_m``, ``sw`` are merged copies the release recomputes from dw1 / qkw / dd in
  ``setup_caches`` (converted checkpoints hold stale ones): their shapes are checked, their
  values not used.
Any other key, a shape the config does not give, or an option outside this list is a one-line
error naming it.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import UsageError
from ..models import ModelConfig, build_model
from ..torch_files import load_weights_only

CONFIG_FILE = "config.json"
MODEL_TYPE = "dcformer"
# window_type -> which layers are local, repeated over the layers (None: the release's default).
WINDOW_TYPES: dict[str | None, tuple[bool, ...]] = {
    None: (True, False),
    "LG": (True, False),
    "LGLL": (True, False, True, True),
    "LGL6": (True, False) + (True,) * 6,
}
# config.json option -> (accepted types, the DCFormerConfig default); None in the types: null allowed.
OPTIONS: dict[str, tuple[tuple[type | None, ...], Any]] = {
    "block_size": ((int,), 2048),
    "vocab_size": ((int,), 32000),
    "n_layer": ((int,), 32),
    "n_head": ((int,), 32),
    "dim": ((int,), 2560),
    "intermediate_size": ((int, None), None),
    "n_local_heads": ((int,), -1),
    "rope_base": ((float,), 500000.0),
    "norm_eps": ((float,), 1e-5),
    "use_qk_norm": ((bool,), False),
    "window_size": ((int, None), 256),
    "window_type": ((str, None), None),
    "query_wise": ((bool,), False),
    "use_sw": ((bool,), False),
    "use_dcmha": ((bool,), True),
    "is_training": ((bool,), False),
}
# Keys that do not change the release's forward: Hugging Face bookkeeping, training- or
# decode-only settings, head_dim (the release recomputes it as dim // n_head), and options its
# model code never reads (tie_word_embeddings: the output head is its own nn.Linear; mgate).
INERT = {
    "architectures",
    "auto_map",
    "model_type",
    "transformers_version",
    "torch_dtype",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "tie_word_embeddings",
    "use_gradient_checkpointing",
    "q_chunk_size",
    "prefill_pad",
    "head_dim",
    "mgate",
    "mgate_dim",
}
PRE, PRE_KEY, POST, POST_KEY = range(4)  # dynamic-weight slots (the release's dw1 / qkw / dd order)


@dataclass(frozen=True)
class DcformerSpec:
    """The release's options that shape its weights and its forward (from config.json, checked)."""

    vocab_size: int
    n_layer: int
    n_head: int
    dim: int
    intermediate_size: int
    n_local_heads: int
    block_size: int
    rope_base: float
    norm_eps: float
    use_qk_norm: bool
    window_size: int | None
    window_type: str | None
    query_wise: bool
    use_sw: bool

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def rank(self) -> int:
        """R: the release's dynamic_hidden_dim, n_head // (n_head // 2) (2 for even n_head)."""
        return self.n_head // (self.n_head // 2)

    @property
    def k_dim(self) -> int:
        return 4 * self.n_head

    @property
    def local_layers(self) -> list[bool]:
        """Per layer: does it attend through the local window mask?"""
        if self.window_size is None:
            return [False] * self.n_layer
        pattern = WINDOW_TYPES[self.window_type]
        return [pattern[i % len(pattern)] for i in range(self.n_layer)]

    def model_config(self) -> ModelConfig:
        """The dcmha causal LM that computes the release's forward."""
        options = dict(
            bias=False,
            rank=self.rank,
            k_dim=self.k_dim,
            qk_norm=self.use_qk_norm,
            rope=True,
            rope_base=self.rope_base,
            rope_fp16_table=True,
            static_mix=self.use_sw,
            kv_heads=self.n_local_heads,
        )
        local = {"window": self.window_size, "window_plus_one": True}
        layers = self.local_layers
        layer_options = [local if is_local else {} for is_local in layers] if any(layers) else None
        return ModelConfig(
            family="lm",
            variant="dcmha",
            options=options,
            layers=self.n_layer,
            d_model=self.dim,
            heads=self.n_head,
            max_len=self.block_size,
            vocab_size=self.vocab_size,
            mlp="swiglu",
            mlp_hidden=self.intermediate_size,
            tie_embeddings=False,
            norm_eps=self.norm_eps,
            layer_options=layer_options,
        )


def _fits(value: Any, kind: type | None) -> bool:
    """JSON value of the kind: null for None, true / false only for bool, ints also for float."""
    if kind is None:
        return value is None
    if isinstance(value, bool):
        return kind is bool
    return isinstance(value, (int, float) if kind is float else kind)


def _option(raw: dict[str, Any], name: str, where: Path) -> Any:
    types, default = OPTIONS[name]
    value = raw.get(name, default)
    if not any(_fits(value, kind) for kind in types):
        names = " or ".join("null" if kind is None else kind.__name__ for kind in types)
        raise UsageError(f"{where}: {name} must be {names}, got {value!r}")
    return float(value) if types[0] is float else value


def read_config(folder: Path) -> DcformerSpec:
    """Parse and check the release's config.json (defaults as DCFormerConfig's)."""
    where = folder / CONFIG_FILE
    if not where.is_file():
        raise UsageError(f"{folder}: no {CONFIG_FILE}, so not a DCFormer release folder")
    try:
        raw = json.loads(where.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{where}: a config is a JSON object, got {type(raw).__name__}")
    if raw.get("model_type", MODEL_TYPE) != MODEL_TYPE:
        raise UsageError(f"{where}: model_type {raw['model_type']!r} is not {MODEL_TYPE!r}")
    unknown = sorted(set(raw) - set(OPTIONS) - INERT)
    if unknown:
        raise UsageError(f"{where}: cannot map DCFormer option {unknown[0]!r} (known: {', '.join(sorted(OPTIONS))})")
    o = {name: _option(raw, name, where) for name in OPTIONS}
    for name in ("block_size", "vocab_size", "n_layer", "dim"):
        if o[name] < 1:
            raise UsageError(f"{where}: {name} must be positive, got {o[name]}")
    if o["is_training"] or not o["use_dcmha"]:
        name = "is_training" if o["is_training"] else "use_dcmha"
        raise UsageError(f"{where}: {name}={o[name]} selects the release's training path, which is not imported")
    if o["n_head"] < 2 or o["dim"] % o["n_head"]:
        raise UsageError(f"{where}: n_head must be >= 2 and divide dim {o['dim']}, got {o['n_head']}")
    kv_heads = o["n_head"] if o["n_local_heads"] == -1 else o["n_local_heads"]
    if kv_heads not in (o["n_head"], 1):
        raise UsageError(
            f"{where}: n_local_heads must be -1, n_head or 1 (the release broadcasts K/V heads), "
            f"got {o['n_local_heads']}"
        )
    if o["window_type"] not in WINDOW_TYPES:
        known = ", ".join(t for t in WINDOW_TYPES if t)
        raise UsageError(f"{where}: window_type must be null or one of {known}, got {o['window_type']!r}")
    if o["window_size"] is not None and o["window_size"] < 1:
        raise UsageError(f"{where}: window_size must be >= 1 or null, got {o['window_size']}")
    hidden = o["intermediate_size"]
    if hidden is None:  # DCFormerConfig: 2/3 of 4 dim, rounded up to a multiple of 256
        hidden = -(-int(8 * o["dim"] / 3) // 256) * 256
    if hidden < 1:
        raise UsageError(f"{where}: intermediate_size must be positive, got {hidden}")
    return DcformerSpec(
        vocab_size=o["vocab_size"],
        n_layer=o["n_layer"],
        n_head=o["n_head"],
        dim=o["dim"],
        intermediate_size=hidden,
        n_local_heads=kv_heads,
        block_size=o["block_size"],
        rope_base=o["rope_base"],
        norm_eps=o["norm_eps"],
        use_qk_norm=o["use_qk_norm"],
        window_size=o["window_size"],
        window_type=o["window_type"],
        query_wise=o["query_wise"],
        use_sw=o["use_sw"],
    )


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    """One weights file: safetensors, or a torch state dict read under the loader policy
    (:func:`attn2onnx.torch_files.load_weights_only`: archive checks, weights-only unpickling)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
        else:
            tensors = load_weights_only(path)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"{path}: unreadable weights ({first})") from None
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for a corrupt file
        if type(e).__name__ != "SafetensorError":
            raise
        raise UsageError(f"{path}: unreadable safetensors ({e})") from None
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
    ):
        raise UsageError(f"{path}: holds a {type(tensors).__name__}, not a dict of named tensors")
    return tensors


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's weights: all *.safetensors files (shards), else all
    pytorch_model*.bin files; a key in two files is an error."""
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise UsageError(f"{folder}: no weights (*.safetensors or pytorch_model*.bin)")
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        part = _read_file(path)
        twice = sorted(set(part) & set(tensors))
        if twice:
            raise UsageError(f"{path}: weight {twice[0]!r} is also in another file of {folder}")
        tensors.update(part)
    return tensors


class _Weights:
    """The release's tensors, taken one by one (shape-checked, as float32); what is never taken
    is an unknown key. ``tensors`` may be ``meta`` tensors (shapes and dtypes only: the checks
    that read values are then left to the real load); ``load`` (key -> tensor) then reads each
    one as it is taken, after its shape is checked (:mod:`attn2onnx.streaming.release`)."""

    def __init__(
        self, tensors: dict[str, torch.Tensor], folder: Path, load: Callable[[str], torch.Tensor] | None = None
    ) -> None:
        self.tensors = dict(tensors)
        self.folder = folder
        self.load = load

    def has(self, key: str) -> bool:
        return key in self.tensors

    def take(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        if key not in self.tensors:
            raise UsageError(f"{self.folder}: the weights lack {key!r}, which its config.json needs")
        tensor = self.tensors.pop(key)
        if tuple(tensor.shape) != tuple(shape):
            raise UsageError(
                f"{self.folder}: weight {key!r} has shape {list(tensor.shape)}, its config needs {list(shape)}"
            )
        if not tensor.is_floating_point():
            raise UsageError(f"{self.folder}: weight {key!r} is {tensor.dtype}, not floating point")
        if self.load is not None:
            tensor = self.load(key)
        return tensor.to(torch.float32)

    def finish(self) -> None:
        if self.tensors:
            first, more = sorted(self.tensors)[0], len(self.tensors) - 1
            raise UsageError(
                f"{self.folder}: cannot map weight {first!r} onto the model its config.json describes"
                + (f" ({more} more unmapped)" if more else "")
            )


def _qkv(w: _Weights, prefix: str, spec: DcformerSpec) -> tuple[torch.Tensor, ...]:
    """Q, K, V projection weights from the fused ``wqkv`` (or the ``wq`` / ``wk`` / ``wv`` that the
    release's load hook fuses)."""
    rows = (spec.dim, spec.n_local_heads * spec.head_dim, spec.n_local_heads * spec.head_dim)
    if w.has(prefix + "wqkv.weight"):
        return w.take(prefix + "wqkv.weight", (sum(rows), spec.dim)).split(rows)
    return tuple(w.take(f"{prefix}w{name}.weight", (n, spec.dim)) for name, n in zip("qkv", rows))


def _static_mix(w: _Weights, prefix: str, spec: DcformerSpec, layer: int) -> torch.Tensor | None:
    """The pre / post static head mix [2,N,N] with use_sw; without it the identity buffers are
    checked (the release ignores them then) and None returned."""
    N = spec.n_head
    mixes = []
    for side in ("pre", "post"):
        key = f"{prefix}{side}_proj.w"
        if spec.use_sw or w.has(key):
            mixes.append(w.take(key, (1, N, N))[0])
    if spec.use_sw:
        return torch.stack(mixes)
    if any(not m.is_meta and not torch.equal(m, torch.eye(N)) for m in mixes):
        raise UsageError(
            f"{w.folder}: layer {layer} holds a static head mix ({prefix}pre_proj.w / post_proj.w "
            "not the identity) but config.json does not set use_sw"
        )
    return None


def _dynamic(w: _Weights, prefix: str, spec: DcformerSpec, layer: int) -> dict[str, torch.Tensor]:
    """dw1 [D,4,K], qkw [4,K,2R,N], dd [D,4N] from the release's grouped layout (one group)."""
    D, N, K, R = spec.dim, spec.n_head, spec.k_dim, spec.rank
    dw1 = w.take(prefix + "dw1", (D, 1, 4, K))[:, 0]
    qkw = w.take(prefix + "qkw", (1, 4, K, 2 * R, N))[0]
    dd = w.take(prefix + "dd", (D, 1, 4 * N))[:, 0]
    for name, shape in (("dw_m", (D, 4 * K + 4 * N)), ("qkw_m", (4, K, 2 * R * N)), ("sw", (2, N, N))):
        if w.has(prefix + name):  # a merged copy the release recomputes from dw1 / qkw / dd
            w.take(prefix + name, shape)
    key_side = [PRE_KEY, POST_KEY]
    if spec.query_wise and not qkw.is_meta and (qkw[key_side].any() or dd.unflatten(-1, (4, N))[:, key_side].any()):
        raise UsageError(
            f"{w.folder}: layer {layer} is query_wise but its key-side dynamic weights ({prefix}qkw / dd "
            "slots 1 and 3) are not zero: the release's forward uses them and its decode does not"
        )
    return {"dw1": dw1, "qkw": qkw, "dd": dd}


def layer_state(w: _Weights, spec: DcformerSpec, layer: int) -> dict[str, torch.Tensor]:
    """Layer ``layer``'s tensors, under the CausalLM's names (``trunk.blocks.{layer}.*``)."""
    D, H, d = spec.dim, spec.intermediate_size, spec.head_dim
    src, dst = f"layers.{layer}.", f"trunk.blocks.{layer}."
    att = src + "attention."
    q, k, v = _qkv(w, att, spec)
    state = {
        "norm1.weight": w.take(src + "attention_norm.weight", (D,)),
        "norm2.weight": w.take(src + "ffn_norm.weight", (D,)),
        "mlp.gate.weight": w.take(src + "feed_forward.w1.weight", (H, D)),
        "mlp.up.weight": w.take(src + "feed_forward.w3.weight", (H, D)),
        "mlp.down.weight": w.take(src + "feed_forward.w2.weight", (D, H)),
        "attn.q_proj.weight": q,
        "attn.k_proj.weight": k,
        "attn.v_proj.weight": v,
        "attn.o_proj.weight": w.take(att + "wo.weight", (D, D)),
    }
    if spec.use_qk_norm:
        state["attn.q_norm_gain"] = w.take(att + "q_norm.scale", (d,))
        state["attn.k_norm_gain"] = w.take(att + "k_norm.scale", (d,))
    state.update({f"attn.{name}": t for name, t in _dynamic(w, att + "dyn_w_proj.", spec, layer).items()})
    mix = _static_mix(w, att + "dyn_w_proj.", spec, layer)
    if mix is not None:
        state["attn.static_mix_weight"] = mix
    return {dst + name: t for name, t in state.items()}


def map_weights(tensors: dict[str, torch.Tensor], spec: DcformerSpec, folder: Path) -> dict[str, torch.Tensor]:
    """The release's state dict -> the state dict of ``spec.model_config()``'s CausalLM."""
    w = _Weights(tensors, folder)
    state = outer_state(w, spec)
    for layer in range(spec.n_layer):
        state.update(layer_state(w, spec, layer))
    w.finish()
    return state


def outer_state(w: _Weights, spec: DcformerSpec) -> dict[str, torch.Tensor]:
    """The tensors outside the layers: embedding, final norm, output head."""
    V, D = spec.vocab_size, spec.dim
    return {
        "embed.weight": w.take("tok_embeddings.weight", (V, D)),
        "norm.weight": w.take("norm.weight", (D,)),
        "head.weight": w.take("output.weight", (V, D)),
    }


def import_dcformer(folder: str | Path) -> nn.Module:
    """A release folder (config.json + weights) -> the equivalent attn2onnx CausalLM (float32, eval)."""
    folder = Path(folder)
    spec = read_config(folder)
    config = spec.model_config()
    state = map_weights(read_weights(folder), spec, folder)
    with torch.device("meta"):  # no memory for weights that are replaced right away
        model = build_model(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


__all__ = [
    "DcformerSpec",
    "import_dcformer",
    "layer_state",
    "map_weights",
    "outer_state",
    "read_config",
    "read_weights",
]
