"""Decode export: one ONNX graph that serves both prefill and decode steps of a causal LM.

:class:`DecodeLM` wraps a :class:`~attn2onnx.models.lm.CausalLM` as
``forward(input_ids [B,T], attention_mask [B,P+T], position_ids [B,T], *past) -> (logits, *present)``
with every layer's cache as explicit tensors, in the names of HF Optimum / onnxruntime-genai
(``past_key_values.{i}.key`` in, ``present.{i}.key`` out). Each variant decides what it caches
and in which layout (its ``cache_entries`` and ``decode_step``): Optimum's head-major K / V
[batch, heads, past, head_dim] where standard attention reads them (mha, optimised, efficient,
super, reuse: MultiHeadAttention takes that past), token-major [batch, past, ...] for dcmha, the
layout DcmhaAttention reads in place (a step then extends each cache with one Concat, no
Transpose either side; benchmarks/RESULTS.md "Decode"). A local-window layer keeps at most its
window's last positions, so its cache has a past dim of its own (``past_window{W-1}``).
Prefill is the same graph with an empty past (past = 0). The graph's metadata
(``attn2onnx.decode``) says what each cache input holds, so :mod:`attn2onnx.generate` and
``validate --decode`` need nothing but the file (:func:`attn2onnx.runtime.metadata.read_decode`
reads it back, checked against the graph).

``attention_mask`` is int64 (1 = real token) over past and new positions, as Optimum's;
``position_ids`` feed the learned positions or RoPE, so left-padded batches can pass either the
padded index (what the full-sequence PyTorch forward computes) or per-row counts.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import onnx
import torch
from torch import nn
from torch.nn import functional as F

from ..custom_ops import DOMAIN
from ..errors import UsageError
from ..graph_format import DECODE_KEY, INPUTS, CacheSpec, past_dim
from ..io_spec import InputSpec
from .lm import CausalLM

# Example sizes for tracing: all above 1 (torch specialises sizes 0 and 1) and distinct, so no
# two dims are taken for one; an empty past still runs (the graph holds no guard on it).
EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST = 2, 3, 5


def check_decodable(model: nn.Module) -> CausalLM:
    """The model as a CausalLM whose every layer has a decode step; a one-line UsageError otherwise."""
    if hasattr(model, "decode_lm"):  # a transformers causal LM (attn2onnx.importers.transformers_decode)
        return model.decode_lm()
    if not isinstance(model, CausalLM):
        raise UsageError("--decode needs an attn2onnx causal LM checkpoint (family lm)")
    for block in model.trunk.blocks:
        if not hasattr(block.attn, "decode_step"):
            raise UsageError(f"decode export not supported for {model.config.variant} yet")
    return model


def cache_specs(model: CausalLM) -> list[CacheSpec]:
    """Every layer's cache tensors, in graph input order."""
    if hasattr(model, "decode_cache_specs"):  # a transformers LM or .pt2 decode program: caches of its own
        return model.decode_cache_specs()
    specs = []
    for layer, block in enumerate(model.trunk.blocks):
        for entry in block.attn.cache_entries():
            dims = tuple(past_dim(entry.limit) if d == "past" else d for d in entry.dims)
            specs.append(
                CacheSpec(
                    layer,
                    f"past_key_values.{layer}.{entry.name}",
                    f"present.{layer}.{entry.name}",
                    dims,
                    entry.holds,
                    entry.limit,
                )
            )
    return specs


class DecodeLM(nn.Module):
    """A CausalLM as one prefill / decode step with explicit caches (see the module docstring).

    forward(input_ids [B,T] int64, attention_mask [B,P+T] int64, position_ids [B,T] int64,
    *past) -> (logits [B,T,V], *present), past / present in :func:`cache_specs` order."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.lm = check_decodable(model)
        self.caches = [len(block.attn.cache_entries()) for block in self.lm.trunk.blocks]

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, *past: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        lm = self.lm
        x = lm.embed(input_ids)
        if lm.pos is not None:
            x = x + lm.pos[position_ids]
        mask = attention_mask.to(torch.bool)
        present: list[torch.Tensor] = []
        probs = None
        for block, count in zip(lm.trunk.blocks, self.caches):
            cache, past = tuple(past[:count]), past[count:]
            h = block.norm1(x)
            if block.passes_probs:
                a, new, probs = block.attn.decode_step(h, mask, position_ids, cache, probs)
            else:
                a, new = block.attn.decode_step(h, mask, position_ids, cache)
            x = x + a
            x = x + block.mlp(block.norm2(x))
            present.extend(new)
        x = lm.norm(x)
        logits = F.linear(x, lm.embed.weight) if lm.head is None else lm.head(x)
        return (logits, *present)

    def empty_past(self, batch: int, past: int = 0) -> list[torch.Tensor]:
        """Zero caches for ``batch`` sequences (past = 0: the prefill's)."""
        dtype = self.lm.embed.weight.dtype
        return [torch.zeros(spec.shape(batch, past), dtype=dtype) for spec in cache_specs(self.lm)]


def input_specs(model: CausalLM) -> list[InputSpec]:
    """The decode graph's inputs as InputSpec rows (dims: batch, seq, past+seq, past...)."""
    config = model.config
    specs = [
        InputSpec("input_ids", ("batch", "seq"), "ids", config.vocab_size),
        InputSpec("attention_mask", ("batch", "past+seq"), "ids", 2),
        InputSpec("position_ids", ("batch", "seq"), "ids", config.max_len),
    ]
    return specs + [InputSpec(c.input, c.dims, "float") for c in cache_specs(model)]


def _dynamic_shapes(specs: list[InputSpec]) -> tuple[Any, ...]:
    """torch.onnx's dynamic_shapes, shaped as forward's arguments (the caches are ``*past``):
    every named dim by its name. torch relates the dims it finds equal (the mask's past+seq to
    the caches' past plus the ids' seq) by itself."""
    dims = [{i: d for i, d in enumerate(spec.dims) if isinstance(d, str)} for spec in specs]
    return (*dims[: len(INPUTS)], tuple(dims[len(INPUTS) :]))


def decode_metadata(model: CausalLM) -> dict[str, Any]:
    """What generate and validate --decode read from the graph: variant, vocabulary, longest
    sequence, and per cache tensor its names, dims, contents and window limit."""
    return cache_metadata(model.config, cache_specs(model))


def cache_metadata(config: Any, caches: list[CacheSpec]) -> dict[str, Any]:
    """:func:`decode_metadata` of a model whose ``config`` has variant, vocab_size and max_len
    and whose caches are ``caches`` (this project's models, transformers' decode wrappers)."""
    return {
        "variant": config.variant,
        "vocab_size": config.vocab_size,
        "max_len": config.max_len,
        "inputs": list(INPUTS),
        "caches": [
            {
                "layer": c.layer,
                "input": c.input,
                "output": c.output,
                "dims": list(c.dims),
                "holds": c.holds,
                "limit": c.limit,
            }
            for c in caches
        ],
    }


def _name_output_dims(proto: onnx.ModelProto, caches: list[CacheSpec]) -> None:
    """Name the outputs' dims as Optimum does (torch writes its own expressions there):
    logits [batch, seq, vocab], present [.., past+seq, ..] (a window layer: min(past_window+seq, L))."""
    outputs = {o.name: o for o in proto.graph.output}
    for cache in caches:
        dims = outputs[cache.output].type.tensor_type.shape.dim
        for dim, want in zip(dims, cache.dims):
            if want == "batch":
                dim.dim_param = "batch"
            elif isinstance(want, str):
                dim.dim_param = "past+seq" if cache.limit is None else f"min({want}+seq, {cache.limit})"
    logits = outputs["logits"].type.tensor_type.shape.dim
    logits[0].dim_param, logits[1].dim_param = "batch", "seq"


def example_inputs(wrapper: DecodeLM) -> tuple[torch.Tensor, ...]:
    """Tracing inputs: a batch of EXAMPLE_BATCH with EXAMPLE_PAST cached positions and EXAMPLE_SEQ new."""
    generator = torch.Generator().manual_seed(0)
    batch, seq, past = EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST
    ids = torch.randint(0, wrapper.lm.config.vocab_size, (batch, seq), generator=generator)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    positions = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    caches = [
        torch.randn(c.shape(batch, past if c.limit is None else max(c.limit, 2)), generator=generator)
        for c in cache_specs(wrapper.lm)
    ]
    return (ids, mask, positions, *caches)


def export_decode(model: nn.Module, path: str | os.PathLike, opset: int = 23):
    """Export ``model`` (a CausalLM) as a decode graph at ``path`` (checked and written
    atomically, as :func:`attn2onnx.exporter.export`); returns the ExportResult."""
    if hasattr(model, "export_decode"):  # a transformers causal LM: its own cache in Optimum's layout
        return model.export_decode(path, opset)
    from ..exporter import ExportResult, to_onnx
    from ..onnx_io import check_model, save_model

    wrapper = DecodeLM(model).eval()
    specs = input_specs(wrapper.lm)
    caches = cache_specs(wrapper.lm)
    output_names = ["logits", *(c.output for c in caches)]
    start = time.perf_counter()
    proto = to_onnx(
        wrapper,
        example_inputs(wrapper),
        specs,
        output_names=output_names,
        opset=opset,
        max_seq=wrapper.lm.config.max_len,
        dynamic_shapes=_dynamic_shapes(specs),
    )
    seconds = time.perf_counter() - start
    _name_output_dims(proto, caches)
    props = {p.key: p.value for p in proto.metadata_props}
    props[DECODE_KEY] = json.dumps(decode_metadata(wrapper.lm))
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, props)
    written = save_model(proto, path, check=check_model)
    return ExportResult(
        path=written,
        inputs=specs,
        output_names=output_names,
        nodes=len(proto.graph.node),
        custom_nodes=sum(1 for n in proto.graph.node if n.domain == DOMAIN),
        seconds=seconds,
    )


__all__ = [
    "DECODE_KEY",
    "CacheSpec",
    "DecodeLM",
    "cache_specs",
    "check_decodable",
    "decode_metadata",
    "export_decode",
    "input_specs",
]
