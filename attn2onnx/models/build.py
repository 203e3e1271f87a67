"""``build_model``: a :class:`~.config.ModelConfig` made into a module of its family.

Here, not in config.py, because it needs the families (lm, encoder, layer), which import the
config: config.py stays a leaf and nothing imports in a cycle. The size checks live here too,
since they count the values of a model built on the meta device.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from ..errors import UsageError
from ..variants import VariantError
from .config import MAX_VALUES, SIZE_FIELDS, ModelConfig, count_values
from .encoder import EncoderClassifier
from .layer import AttentionLayer
from .lm import CausalLM

_PER_LAYER_FIELDS = ("reuse_schedule", "layer_options")  # reset with ``layers`` when blaming it


def meta_model(config: ModelConfig) -> nn.Module:
    """The model of ``config`` on the meta device: its structure, names and shapes, with
    nothing allocated. Raises OverflowError / RuntimeError for a tensor torch cannot describe."""
    with torch.device("meta"):
        return _instantiate(config)


def state_size(config: ModelConfig) -> float:
    """Values in the state of the model ``config`` describes, counted without allocating;
    ``math.inf`` when a tensor is too large for torch to describe."""
    try:
        return count_values(meta_model(config))
    except (RuntimeError, OverflowError):
        return math.inf


def check_size(config: ModelConfig) -> None:
    """Refuse (UsageError naming the config field to lower), before anything is allocated, a
    config whose model holds more than ``MAX_VALUES`` values."""
    size = state_size(config)
    if size <= MAX_VALUES:
        return
    name = _field_to_blame(config)
    count = "too many" if size == math.inf else f"{size:,}"
    raise UsageError(
        f"{name}={getattr(config, name)} makes a model of {count} values, more than attn2onnx builds "
        f"(MAX_VALUES = {MAX_VALUES:,}, {MAX_VALUES * 4 / 2**30:.0f} GiB as float32); lower {name}"
    )


def _field_to_blame(config: ModelConfig) -> str:
    """The size field whose default value shrinks the model most (``layers`` with the per-layer
    lists that follow it); the largest size field when no default makes a valid config."""
    fields = {f.name: f.default for f in dataclasses.fields(config)}
    sizes = {}
    for name in SIZE_FIELDS:
        if getattr(config, name) == fields[name]:
            continue
        changes = {name: fields[name]}
        if name == "layers":
            changes.update({other: None for other in _PER_LAYER_FIELDS if other in fields})
        try:
            sizes[name] = state_size(dataclasses.replace(config, **changes))
        except (UsageError, VariantError):
            continue
    return min(sizes, key=sizes.get) if sizes else max(SIZE_FIELDS, key=lambda name: getattr(config, name))


def _instantiate(config: ModelConfig) -> nn.Module:
    """The family module of ``config``, initialised from ``config.seed`` (global RNG untouched)."""
    family = {"lm": CausalLM, "encoder": EncoderClassifier, "layer": AttentionLayer}[config.family]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return family(config)


def build_model(config: ModelConfig | dict[str, Any]) -> nn.Module:
    """A randomly initialised model of ``config.family`` (deterministic in ``config.seed``;
    the global RNG is left untouched). The model keeps its config as ``model.config``.
    Its size is checked first (:func:`check_size`)."""
    if isinstance(config, dict):
        config = ModelConfig.from_dict(config)
    elif not isinstance(config, ModelConfig):
        raise UsageError(f"build_model takes a ModelConfig or a dict, got {type(config).__name__}")
    check_size(config)
    return _instantiate(config)


__all__ = ["build_model", "check_size", "meta_model", "state_size"]
