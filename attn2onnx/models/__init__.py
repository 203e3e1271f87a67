"""The model families every attention variant plugs into: ``CausalLM`` (lm),
``EncoderClassifier`` (encoder) and ``AttentionLayer`` (layer), all built from one
``ModelConfig`` by ``build_model``."""

from .build import build_model
from .config import FAMILIES, ModelConfig
from .encoder import EncoderClassifier
from .layer import AttentionLayer
from .lm import CausalLM

__all__ = ["FAMILIES", "AttentionLayer", "CausalLM", "EncoderClassifier", "ModelConfig", "build_model"]
