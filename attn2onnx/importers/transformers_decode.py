"""Decode graphs of Hugging Face causal LMs: ``attn2onnx export DIR --decode``.

One graph serves prefill and decode steps, in Optimum's names and layout:
``forward(input_ids [B,T], attention_mask [B,P+T], position_ids [B,T], past_key_values.{i}.key,
past_key_values.{i}.value ...) -> (logits, present.{i}.key, present.{i}.value ...)``, every cache
[batch, kv_heads, past, head_dim] (checked on the model before export). The transformers model
runs with a DynamicCache filled from the past inputs, so its own attention, masks (padding,
sliding windows) and positions are what is exported. The graph carries the ``attn2onnx.decode``
metadata of :mod:`attn2onnx.models.decode`, so ``attn2onnx generate`` and ``validate --decode``
take it as they take this project's own decode graphs.

:class:`TransformersLM` is the causal LM as those commands expect it: ``lm(ids, mask)`` is the
full-sequence forward (the reference a decode graph is checked against), ``lm.config`` says its
vocabulary, longest sequence and variant (``transformers:<model_type>``), and
``lm.export_decode(path)`` writes the decode graph.
"""

from __future__ import annotations

import inspect
import json
import os
import time
from dataclasses import dataclass
from typing import Any

import onnx
import torch
from torch import nn

from ..errors import UsageError
from ..io_spec import InputSpec

DEFAULT_MAX_LEN = 4096  # positions of a model that declares no longest sequence (ALiBi, BLOOM)
PROBE_BATCH, PROBE_SEQ = 2, 3  # a forward at this size shows the cache layout


@dataclass(frozen=True)
class LMConfig:
    """What decode export and its check read of a causal LM (as of attn2onnx's own LMs)."""

    vocab_size: int
    max_len: int
    variant: str
    family: str = "lm"


def _max_len(config: Any) -> int:
    return (
        getattr(config, "max_position_embeddings", None)
        or getattr(config, "n_positions", None)
        or getattr(config, "seq_length", None)
        or DEFAULT_MAX_LEN
    )


class TransformersLM(nn.Module):
    """A transformers causal LM as the decode commands take it: ``forward(ids, mask)`` the
    full-sequence logits (mask: 1 / True = real token; positions the padded index, what
    validate --decode feeds the decode graph)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        config = model.config.get_text_config()
        self.config = LMConfig(config.vocab_size, _max_len(config), f"transformers:{config.model_type}")

    def decode_lm(self) -> TransformersLM:
        return self

    def decode_cache_specs(self) -> list:
        """Its decode graph's cache tensors (:func:`cache_specs`, layout read by :func:`cache_layout`)."""
        kv_heads, head_dim = cache_layout(self.model.eval())
        return cache_specs(self.model.config.get_text_config().num_hidden_layers, kv_heads, head_dim)

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, seq = input_ids.shape
        positions = (
            {"position_ids": torch.arange(seq).expand(batch, seq)}  # OPT would count them from the mask
            if "position_ids" in inspect.signature(self.model.forward).parameters
            else {}
        )
        return self.model(input_ids=input_ids, attention_mask=mask.long(), **positions, use_cache=False).logits

    def export_decode(self, path: str | os.PathLike, opset: int = 23):
        """Write the decode graph to ``path`` (:func:`export_decode`)."""
        return export_decode(self, path, opset)


def cache_argument(model: nn.Module, cache: Any) -> dict[str, Any]:
    """The keyword ``model`` takes its cache by: ``cache`` (transformers 5.x), else ``past_key_values``."""
    return {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}


def returned_cache(output: Any) -> Any:
    """The updated cache of a model's output (``cache``, or ``past_key_values`` before 5.x)."""
    return output.cache if "cache" in output else output.past_key_values


def cache_layout(model: nn.Module) -> tuple[int, int]:
    """(kv_heads, head_dim) of every layer's cache, read from a probe forward; a one-line
    UsageError where the cache is not Optimum's [batch, kv_heads, past, head_dim] alike in
    every layer (or is not a key / value cache at all)."""
    from transformers import DynamicCache

    ids = torch.zeros(PROBE_BATCH, PROBE_SEQ, dtype=torch.long)
    with torch.inference_mode():
        cache = returned_cache(model(input_ids=ids, **cache_argument(model, DynamicCache()), use_cache=True))
    shapes = {tuple(t.shape) for layer in getattr(cache, "layers", ()) for t in (layer.keys, layer.values)}
    if len(shapes) != 1 or (shape := next(iter(shapes)))[0] != PROBE_BATCH or shape[2] != PROBE_SEQ:
        raise UsageError(
            f"{type(model).__name__}: its cache is not [batch, heads, past, head_dim] in every layer "
            f"(shapes {sorted(shapes)}); decode export supports that layout only"
        )
    return shape[1], shape[3]


class DecodeCall(nn.Module):
    """The decode graph's forward: the model on the new ids with a DynamicCache holding the
    past inputs (pairs key, value per layer); its logits and every layer's updated cache."""

    def __init__(self, model: nn.Module, layers: int) -> None:
        super().__init__()
        self.model = model
        self.layers = layers
        self.takes_positions = "position_ids" in inspect.signature(model.forward).parameters

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, *past: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache()
        for layer in range(self.layers):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        positions = {"position_ids": position_ids} if self.takes_positions else {}  # BLOOM: ALiBi, none
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            **positions,
            **cache_argument(self.model, cache),
            use_cache=True,
        )
        present = [t for layer in returned_cache(out).layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)


def cache_specs(layers: int, kv_heads: int, head_dim: int) -> list:
    """Per layer its key and value cache in Optimum's names, [batch, kv_heads, past, head_dim]."""
    from ..models.decode import CacheSpec

    return [
        CacheSpec(
            i, f"past_key_values.{i}.{kind}", f"present.{i}.{kind}", ("batch", kv_heads, "past", head_dim), kind, None
        )
        for i in range(layers)
        for kind in ("key", "value")
    ]


def export_decode(lm: TransformersLM, path: str | os.PathLike, opset: int = 23):
    """Export ``lm``'s decode graph at ``path`` (:func:`write_decode_graph`); the ExportResult."""
    caches = lm.decode_cache_specs()
    return write_decode_graph(DecodeCall(lm.model, len(caches) // 2), lm.config, caches, path, opset)


def write_decode_graph(call: nn.Module, config: LMConfig, caches: list, path: str | os.PathLike, opset: int = 23):
    """Export ``call`` (``forward(input_ids, attention_mask, position_ids, *past) -> (logits,
    *present)``, caches in ``caches``' order) as a decode graph at ``path``, checked and written
    atomically as :func:`attn2onnx.exporter.export`, with the ``attn2onnx.decode`` metadata of
    ``config`` and ``caches``; the ExportResult. Shared by transformers folders and .pt2 programs."""
    from ..exporter import export_result, to_onnx
    from ..models.decode import DECODE_KEY, EXAMPLE_BATCH, EXAMPLE_PAST, EXAMPLE_SEQ
    from ..models.decode import _dynamic_shapes, _name_output_dims, cache_metadata
    from ..onnx_io import check_model, save_model

    specs = [
        InputSpec("input_ids", ("batch", "seq"), "ids", config.vocab_size),
        InputSpec("attention_mask", ("batch", "past+seq"), "ids", 2),
        InputSpec("position_ids", ("batch", "seq"), "ids", config.max_len),
        *(InputSpec(c.input, c.dims, "float") for c in caches),
    ]
    generator = torch.Generator().manual_seed(0)
    batch, seq, past = EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST
    example = (
        torch.randint(0, config.vocab_size, (batch, seq), generator=generator),
        torch.ones(batch, past + seq, dtype=torch.int64),
        torch.arange(past, past + seq).expand(batch, seq).contiguous(),
        *(torch.randn(c.shape(batch, past), generator=generator) for c in caches),
    )
    output_names = ["logits", *(c.output for c in caches)]
    start = time.perf_counter()
    proto = to_onnx(
        call,
        example,
        specs,
        output_names=output_names,
        opset=opset,
        max_seq=config.max_len,
        dynamic_shapes=_dynamic_shapes(specs),
    )
    seconds = time.perf_counter() - start
    _name_output_dims(proto, caches)
    meta = cache_metadata(config, caches)
    onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props}, DECODE_KEY: json.dumps(meta)})
    written = save_model(proto, path, check=check_model)
    return export_result(proto, written, specs, seconds)
