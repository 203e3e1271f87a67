"""Tiny random-weight Hugging Face transformers models (2 layers, hidden 32), one per
architecture, saved with save_pretrained into a folder: what a user's folder looks like,
built locally (nothing downloaded). :func:`save_tiny` writes one; ``ARCHITECTURES`` names them.

Each entry: (config class, its keyword arguments, model class, kind) where kind is
``decoder`` (causal LM), ``encoder`` (text) or ``image``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

VOCAB = 97
HIDDEN = 32
HEADS = 4
TINY = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS)
POSITIONS = dict(max_position_embeddings=128)
DECODER_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)

MODELS: dict[str, tuple[str, dict[str, Any], str, str]] = {
    "gpt2": (
        "GPT2Config",
        dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=HEADS, n_positions=128, **DECODER_IDS),
        "GPT2LMHeadModel",
        "decoder",
    ),
    "llama": (
        "LlamaConfig",
        dict(TINY, num_key_value_heads=2, intermediate_size=64, **POSITIONS, **DECODER_IDS),
        "LlamaForCausalLM",
        "decoder",
    ),
    "mistral": (
        "MistralConfig",
        dict(TINY, num_key_value_heads=2, intermediate_size=64, sliding_window=None, **POSITIONS, **DECODER_IDS),
        "MistralForCausalLM",
        "decoder",
    ),
    "qwen2": (
        "Qwen2Config",
        dict(TINY, num_key_value_heads=2, intermediate_size=64, **POSITIONS, **DECODER_IDS),
        "Qwen2ForCausalLM",
        "decoder",
    ),
    "gemma": (
        "GemmaConfig",
        dict(TINY, num_key_value_heads=1, head_dim=8, intermediate_size=64, **POSITIONS, **DECODER_IDS),
        "GemmaForCausalLM",
        "decoder",
    ),
    "gemma2": (  # tanh soft-capping of the attention logits, sliding-window layers alternating with global ones
        "Gemma2Config",
        dict(
            TINY,
            num_key_value_heads=2,
            head_dim=8,
            intermediate_size=64,
            query_pre_attn_scalar=8,
            attn_logit_softcapping=50.0,
            sliding_window=16,
            **POSITIONS,
            **DECODER_IDS,
        ),
        "Gemma2ForCausalLM",
        "decoder",
    ),
    "phi3": (
        "Phi3Config",
        dict(TINY, num_key_value_heads=2, intermediate_size=64, **POSITIONS, **DECODER_IDS),
        "Phi3ForCausalLM",
        "decoder",
    ),
    "gpt_neox": (
        "GPTNeoXConfig",
        dict(TINY, intermediate_size=64, **POSITIONS, **DECODER_IDS),
        "GPTNeoXForCausalLM",
        "decoder",
    ),
    "falcon": (
        "FalconConfig",
        dict(TINY, **POSITIONS, **DECODER_IDS),
        "FalconForCausalLM",
        "decoder",
    ),
    "opt": (
        "OPTConfig",
        dict(TINY, ffn_dim=64, word_embed_proj_dim=HIDDEN, **POSITIONS, bos_token_id=1, eos_token_id=2, pad_token_id=3),
        "OPTForCausalLM",
        "decoder",
    ),
    "bloom": (
        "BloomConfig",
        dict(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=2, n_head=HEADS, **DECODER_IDS),
        "BloomForCausalLM",
        "decoder",
    ),
    "bert": ("BertConfig", dict(TINY, intermediate_size=64, **POSITIONS), "BertForMaskedLM", "encoder"),
    "roberta": ("RobertaConfig", dict(TINY, intermediate_size=64, **POSITIONS), "RobertaModel", "encoder"),
    "vit": (
        "ViTConfig",
        dict(
            hidden_size=HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=HEADS,
            intermediate_size=64,
            image_size=16,
            patch_size=4,
            num_labels=3,
        ),
        "ViTForImageClassification",
        "image",
    ),
    "t5_encoder": (
        "T5Config",
        dict(vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=64, num_layers=2, num_heads=HEADS),
        "T5EncoderModel",
        "encoder",
    ),
}
ARCHITECTURES = list(MODELS)
DECODERS = [name for name, entry in MODELS.items() if entry[3] == "decoder"]


def save_tiny(name: str, folder: Path, seed: int = 0) -> Path:
    """Write architecture ``name``'s tiny random model into ``folder`` with save_pretrained
    (config.json + model.safetensors) and return ``folder``."""
    import torch
    import transformers

    config_class, kwargs, model_class, _ = MODELS[name]
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**kwargs))
    save_quietly(model, folder)
    return folder


def save_quietly(model: Any, folder: Path, **options: Any) -> None:
    """model.save_pretrained(folder, **options) without its progress bar on stderr (tests read stderr)."""
    from transformers.utils import logging

    bars = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        model.save_pretrained(folder, **options)
    finally:
        if bars:
            logging.enable_progress_bar()
