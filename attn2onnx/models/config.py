"""``ModelConfig``: one plain dataclass that describes any model of any family
(:func:`attn2onnx.models.build.build_model` turns it into a module).

A config is checked when it is made (``ModelConfig(...)`` raises ``UsageError`` /
``VariantError`` with one line saying what to change), so a model, a checkpoint or a CLI call
never carries a config that cannot build.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..errors import UsageError
from ..variants import AttentionConfig, VariantError, get_variant, make_config

FAMILIES = ("lm", "encoder", "layer")
MLP_KINDS = ("swiglu", "gelu")
# AttentionConfig fields the family sets from its own fields; not settable as variant options.
_FAMILY_OWNED = {"d_model": "d_model", "n_heads": "heads", "max_len": "max_len", "causal": "family"}
REUSE_FIELD = "reuse_heads"  # ReuseConfig option: reused heads of one layer
REUSE_DEFAULT_RUN = 6  # variants.md §7: layer 0 computes, layers 1..6 reuse all heads
# Size bounds, checked before anything is allocated (a config is a few bytes; its model need not be).
MAX_LAYERS = 1024  # as deep as the deepest published transformers (DeepNet); bounds the cost of counting
MAX_VALUES = 1 << 33  # values in one model's state: 8 Gi, 32 GiB as float32
SIZE_FIELDS = ("layers", "d_model", "heads", "mlp_hidden", "max_len", "vocab_size", "num_classes", "channels")


@dataclass
class ModelConfig:
    """Everything needed to build a model; stored verbatim (``to_dict``) in checkpoints.

    family: ``lm`` (CausalLM), ``encoder`` (EncoderClassifier) or ``layer`` (AttentionLayer).
    variant / options: the attention variant's registry name and its own options (the keyword
        options of ``attn2onnx.variants.make_config``, minus d_model / n_heads / max_len /
        causal, which come from this config; the ``layer`` family may set ``causal``).
    layers: number of blocks (default 2; the ``layer`` family has exactly 1).
    max_len: longest sequence (tokens seen by attention, CLS included for the encoder).
    vocab_size: token ids of the LM and of the token-input encoder.
    num_classes: encoder outputs.
    patch_size / image_size / channels: set patch_size and image_size for an image encoder
        (ViT-style, input [B,C,H,W] with H = W = image_size); leave them None for token input.
    mlp: ``swiglu`` or ``gelu`` (default: swiglu for the LM, gelu for the encoder).
    mlp_hidden: MLP width (default 4 D for gelu, 8/3 D rounded up to a multiple of 8 for swiglu).
    tie_embeddings: LM head shares the token embedding.
    reuse_schedule: per-layer count of reused heads, for variants that pass probabilities
        (reuse). Default [0, N x6, 0, ...] truncated to ``layers``; layer 0 is always 0.
    layer_options: per-layer variant options, one dict per layer, each overriding ``options``
        for its layer (e.g. a local window on some layers only, as DCFormer's LG / LGLL models).
    norm_eps: epsilon of the blocks' and the final normalisation (RMSNorm / LayerNorm).
    seed: initialisation seed (build_model is deterministic given the config).
    """

    family: str = "lm"
    variant: str = "mha"
    options: dict[str, Any] = field(default_factory=dict)
    layers: int | None = None
    d_model: int = 64
    heads: int = 4
    max_len: int = 256
    vocab_size: int = 256
    num_classes: int = 10
    patch_size: int | None = None
    image_size: int | None = None
    channels: int = 3
    mlp: str | None = None
    mlp_hidden: int | None = None
    tie_embeddings: bool = True
    reuse_schedule: list[int] | None = None
    layer_options: list[dict[str, Any]] | None = None
    norm_eps: float = 1e-6
    seed: int = 0

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise UsageError(f"unknown model family {self.family!r}; known: {', '.join(FAMILIES)}")
        if self.layers is None:
            self.layers = 1 if self.family == "layer" else 2
        if self.family == "layer" and self.layers != 1:
            raise UsageError(f"the layer family is one bare attention layer; got layers={self.layers}")
        self._check_positive("layers", "d_model", "heads", "max_len", "vocab_size", "num_classes", "channels")
        if self.layers > MAX_LAYERS:
            raise UsageError(f"layers={self.layers} is more than attn2onnx builds (MAX_LAYERS = {MAX_LAYERS})")
        if self.mlp is None:
            self.mlp = "swiglu" if self.family == "lm" else "gelu"
        if self.mlp not in MLP_KINDS:
            raise UsageError(f"unknown mlp {self.mlp!r}; known: {', '.join(MLP_KINDS)}")
        if self.mlp_hidden is None:
            self.mlp_hidden = 4 * self.d_model if self.mlp == "gelu" else 8 * math.ceil(8 * self.d_model / 3 / 8)
        self._check_positive("mlp_hidden")
        if isinstance(self.norm_eps, bool) or not isinstance(self.norm_eps, (int, float)) or not self.norm_eps > 0:
            raise UsageError(f"norm_eps must be a positive number, got {self.norm_eps!r}")
        self.norm_eps = float(self.norm_eps)
        self._check_image()
        if not isinstance(self.options, dict):
            raise UsageError(f"options must be a dict of variant options, got {type(self.options).__name__}")
        self.options = dict(self.options)
        self._check_variant()

    # --- checks ------------------------------------------------------------------------------
    def _check_positive(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UsageError(f"{name} must be a positive integer, got {value!r}")
            if value > MAX_VALUES:  # no model holds fewer values than one of its sizes (used or not)
                raise UsageError(
                    f"{name}={value} is more than attn2onnx builds (MAX_VALUES = {MAX_VALUES:,}); lower {name}"
                )

    @property
    def is_image(self) -> bool:
        return self.patch_size is not None

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2 if self.is_image else 0

    def _check_image(self) -> None:
        if (self.patch_size is None) != (self.image_size is None):
            raise UsageError("set both patch_size and image_size for image input, or neither for token input")
        if not self.is_image:
            if self.family == "encoder" and self.max_len < 2:  # max_len counts the CLS token
                raise UsageError(
                    f"a token encoder's max_len counts its CLS token: max_len {self.max_len} leaves "
                    "no room for a token; use max_len >= 2"
                )
            return
        if self.family != "encoder":
            raise UsageError(f"patch_size / image_size are encoder options, not for family {self.family!r}")
        self._check_positive("patch_size", "image_size")
        if self.image_size % self.patch_size:
            raise UsageError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        tokens = self.num_patches + 1
        if tokens > self.max_len:
            raise UsageError(
                f"a {self.image_size}x{self.image_size} image in {self.patch_size}x{self.patch_size} patches makes "
                f"{tokens} tokens (CLS included), more than max_len {self.max_len}; raise max_len"
            )

    @property
    def causal(self) -> bool:
        if self.family == "lm":
            return True
        if self.family == "layer":
            return bool(self.options.get("causal", False))
        return False

    @property
    def passes_probs(self) -> bool:
        return bool(getattr(get_variant(self.variant).module_cls, "passes_probs", False))

    def _check_variant(self) -> None:
        info = get_variant(self.variant)
        if self.family == "lm" and not info.causal:
            raise VariantError(
                f"variant {self.variant!r} cannot be causal, so it cannot make a causal LM; "
                f"it fits: {', '.join(info.families)}"
            )
        if self.causal and not info.causal:
            raise VariantError(f"variant {self.variant!r} cannot be causal")
        if self.family not in info.families:
            raise VariantError(
                f"variant {self.variant!r} does not fit the {self.family} family; it fits: {', '.join(info.families)}"
            )
        self._check_option_names(self.options)
        self.options = coerce_options(self.variant, self.options)
        self._check_layer_options()
        if self.passes_probs:
            self._check_reuse_schedule()
        elif self.reuse_schedule is not None:
            raise UsageError(
                f"reuse_schedule applies to variants that pass probabilities (reuse), not {self.variant!r}"
            )
        try:
            self.attention_configs()  # the variant's own checks (divisibility, option values)
        except VariantError:
            raise
        except (TypeError, ValueError) as e:
            raise VariantError(f"variant {self.variant!r} rejects these options: {e}") from None

    def _check_option_names(self, options: dict[str, Any]) -> None:
        for key in options:
            owner = _FAMILY_OWNED.get(key)
            if owner is not None and not (key == "causal" and self.family == "layer"):
                hint = "it follows the family" if owner == "family" else f"set the model's {owner} instead"
                raise UsageError(f"option {key!r} is not a variant option here ({hint})")

    def _check_layer_options(self) -> None:
        if self.layer_options is None:
            return
        per_layer = self.layer_options
        if not isinstance(per_layer, (list, tuple)) or len(per_layer) != self.layers:
            raise UsageError(f"layer_options must list one dict per layer ({self.layers}), got {per_layer!r}")
        for options in per_layer:
            if not isinstance(options, dict):
                raise UsageError(f"layer_options entries are dicts of variant options, got {options!r}")
            self._check_option_names(options)
        self.layer_options = [coerce_options(self.variant, options) for options in per_layer]

    def _check_reuse_schedule(self) -> None:
        field_name = reuse_field(self.variant)
        if field_name in self.options:
            raise UsageError(f"set reused heads per layer with reuse_schedule, not the option {field_name!r}")
        if self.reuse_schedule is None:
            self.reuse_schedule = ([0] + [self.heads] * REUSE_DEFAULT_RUN + [0] * self.layers)[: self.layers]
        schedule = self.reuse_schedule
        if not isinstance(schedule, (list, tuple)) or len(schedule) != self.layers:
            raise UsageError(f"reuse_schedule must list one count per layer ({self.layers}), got {schedule!r}")
        schedule = list(schedule)
        for count in schedule:
            if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= self.heads:
                raise UsageError(f"reuse_schedule counts must be integers in [0, {self.heads}], got {schedule!r}")
        if schedule[0] != 0:
            raise UsageError(
                f"reuse_schedule must start with 0 (layer 0 has no probabilities to reuse), got {schedule!r}"
            )
        self.reuse_schedule = schedule

    # --- what the families use ---------------------------------------------------------------
    def attention_configs(self) -> list[AttentionConfig]:
        """One variant config per layer (they differ in a reuse model's reused heads and by
        ``layer_options``)."""
        options = dict(self.options)
        options.update(d_model=self.d_model, n_heads=self.heads, max_len=self.max_len, causal=self.causal)
        per_layer = [dict(layer) for layer in self.layer_options or [{}] * self.layers]
        if self.passes_probs:
            name = reuse_field(self.variant)
            for layer, count in zip(per_layer, self.reuse_schedule):
                layer[name] = count
        if not any(per_layer):
            return [make_config(self.variant, **options)] * self.layers
        return [make_config(self.variant, **{**options, **layer}) for layer in per_layer]

    @property
    def uses_rope(self) -> bool:
        """The variant encodes positions itself (dcmha with rope=True): no learned positions."""
        return bool(getattr(self.attention_configs()[0], "rope", False))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        if not isinstance(data, dict):
            raise UsageError(f"a model config is a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UsageError(f"unknown model config key(s): {', '.join(map(str, unknown))}")
        return cls(**data)


def reuse_field(variant: str) -> str:
    """Name of the config field holding a probability-passing variant's reused-head count."""
    name = REUSE_FIELD
    if name not in {f.name for f in dataclasses.fields(get_variant(variant).config_cls)}:
        raise VariantError(f"variant {variant!r} passes probabilities but has no {name!r} option")
    return name


def _fit(value: Any, hint: Any) -> tuple[bool, Any]:
    """Whether ``value`` fits the type hint (bool, int, float, str, None, unions, Literal,
    tuple[...] / list[...]), and the value converted (int -> float, list -> tuple)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True, value
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            ok, converted = _fit(value, arg)
            if ok:
                return True, converted
        return False, value
    if origin is typing.Literal:
        return value in args, value
    if hint is type(None):
        return value is None, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if hint is str:
        return isinstance(value, str), value
    if hint in (tuple, list) or origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return False, value
        item = args[0] if args and (origin is list or len(args) == 2 and args[1] is Ellipsis) else Any
        items = [_fit(v, item) for v in value]
        if not all(ok for ok, _ in items):
            return False, value
        converted = [v for _, v in items]
        return True, tuple(converted) if (hint is tuple or origin is tuple) else converted
    return True, value  # a type this check does not know: the variant's config decides


def _hint_text(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def coerce_options(variant: str, options: dict[str, Any]) -> dict[str, Any]:
    """Check variant options against their config fields' type hints (ints where an int is
    due, lists become tuples where a tuple is due); unknown names are left to make_config."""
    cls = get_variant(variant).config_cls
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in options.items():
        hint = hints.get(key, Any)
        ok, converted = _fit(value, hint)
        if not ok:
            raise VariantError(f"option {key!r} of variant {variant!r} takes {_hint_text(hint)}, got {value!r}")
        out[key] = converted
    return out


def count_values(model: nn.Module) -> int:
    """Values in a model's state (parameters and persistent buffers, shared ones once)."""
    return sum(t.numel() for t in {id(t): t for t in model.state_dict(keep_vars=True).values()}.values())


__all__ = [
    "FAMILIES",
    "MAX_LAYERS",
    "MAX_VALUES",
    "MLP_KINDS",
    "SIZE_FIELDS",
    "ModelConfig",
    "coerce_options",
    "count_values",
    "reuse_field",
]
