"""The pieces of the decode-step benchmarks (benchmarks/generate.py, shared_kv.py, genai.py):
the models, an eager PyTorch step with a static (preallocated, in-place) KV cache, the timed
runners of every engine, the memory floor of a step and the bandwidth it is measured at.

A *runner* times one engine's decode step: ``prepare(batch, context)`` gives it ``context``
cached positions per row (random contents, all real: a step's cost does not depend on them;
GenAI, which takes no cache from outside, prefills that many random tokens), ``step()`` runs one
new token per row, ``release()`` drops the caches so that only one engine's caches are alive at
a time. The floor of a step is the least it can read: the weights once at the width they are
stored at, and every cached position once.
"""

from __future__ import annotations

import functools
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

THREADS = 2
VOCAB = 256
LAYERS = 4
GENAI_CHUNK = 1024  # GenAI prefill chunk at batch 1 (it takes one append_tokens call at batch > 1)


# ---------------------------------------------------------------- models
def build(variant: str, max_len: int, d_model: int = 512, heads: int = 8, layers: int = LAYERS) -> nn.Module:
    """A random-weight LM of ``variant`` (vocabulary 256, swiglu MLP, RMSNorm, tied head)."""
    import attn2onnx

    config = attn2onnx.ModelConfig(
        family="lm", variant=variant, layers=layers, d_model=d_model, heads=heads, max_len=max_len
    )
    return attn2onnx.build_model(config).eval()


def write_llama_folder(folder: Path, d_model: int, heads: int, layers: int, hidden: int, max_len: int) -> Path:
    """A random-weight transformers Llama folder of the given size (vocabulary 256, tied head, no
    biases) with the byte tokenizer attn2onnx writes for GenAI (its model builder needs one):
    the one architecture both onnxruntime_genai's model builder and `attn2onnx export --decode`
    take from a local folder."""
    import transformers

    from attn2onnx.genai import write_byte_tokenizer

    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=d_model,
        intermediate_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_len,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(folder)
    write_byte_tokenizer(folder)
    return folder


def build_with_genai_builder(hf_folder: Path, out: Path) -> Path:
    """onnxruntime_genai's model builder (fp32, CPU) on a local transformers folder, its session
    set to THREADS intra-op threads as :func:`set_genai_threads` does for ours. The builder adds
    the tokenizer's end-of-text id (256, past the vocabulary) to the EOS ids, which GenAI then
    refuses: only the ids inside the vocabulary are kept."""
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_folder), "-o", str(out)]
    subprocess.run([*cmd, "-p", "fp32", "-e", "cpu"], check=True, capture_output=True, stdin=subprocess.DEVNULL)
    set_genai_threads(out)
    path = out / "genai_config.json"
    settings = json.loads(path.read_text())
    eos = settings["model"]["eos_token_id"]
    settings["model"]["eos_token_id"] = [i for i in (eos if isinstance(eos, list) else [eos]) if i < VOCAB]
    path.write_text(json.dumps(settings, indent=2))
    return out


def set_genai_threads(folder: Path, threads: int = THREADS) -> None:
    """Give a GenAI folder's decoder session ``threads`` intra-op threads (and one inter-op)."""
    path = folder / "genai_config.json"
    settings = json.loads(path.read_text())
    settings["model"]["decoder"]["session_options"].update(intra_op_num_threads=threads, inter_op_num_threads=1)
    path.write_text(json.dumps(settings, indent=2))


# ---------------------------------------------------------------- eager, static KV cache
STATIC_VARIANTS = ("mha", "dcmha")


class StaticCacheLM(nn.Module):
    """A CausalLM's decode step in eager PyTorch with a static KV cache, as transformers'
    StaticCache runs one: every cache is a buffer of ``capacity`` positions allocated once
    (:meth:`allocate`); a step writes its new rows in place (``index_copy_`` at the cache
    positions) and attends over the valid prefix (a view of the buffer, no copy). mha keeps
    Optimum's head-major K / V [B,N,S,d] and attends with ``F.scaled_dot_product_attention``;
    dcmha keeps its token-major K / V / key factors and attends with its own op
    (``DcmhaAttention._attend``), as its growing-cache step does. Rows are all real (no padding);
    a chunk of several tokens is taken from an empty cache only (the prefill)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        from attn2onnx.models.decode import check_decodable

        self.lm = check_decodable(model)
        variant = self.lm.config.variant
        if variant not in STATIC_VARIANTS:
            raise ValueError(f"StaticCacheLM covers {', '.join(STATIC_VARIANTS)}, not {variant}")
        if variant == "dcmha" and any(b.attn.config.window_keys for b in self.lm.trunk.blocks):
            raise ValueError("StaticCacheLM does not cover local-window layers")
        self.caches: list[tuple[torch.Tensor, ...]] = []
        self.length = 0

    def allocate(self, batch: int, capacity: int, length: int = 0, generator: torch.Generator | None = None) -> None:
        """Buffers of ``capacity`` positions for ``batch`` rows, the first ``length`` valid
        (random with ``generator``, zeros otherwise)."""
        fill = (lambda s: torch.rand(s, generator=generator)) if generator is not None else torch.zeros  # noqa: E731
        self.caches = []
        for block in self.lm.trunk.blocks:
            c = block.attn.config
            if self.lm.config.variant == "mha":
                shapes = [(batch, c.n_heads, capacity, c.head_dim)] * 2
            else:
                shapes = [(batch, capacity, c.n_heads, c.head_dim)] * 2 + [
                    (batch, capacity, 2, 2 * c.rank + 1, c.n_heads)
                ]
            caches = tuple(torch.zeros(s) for s in shapes)
            axis = 2 if self.lm.config.variant == "mha" else 1
            for cache in caches:
                cache.narrow(axis, 0, length).copy_(fill(cache.narrow(axis, 0, length).shape))
            self.caches.append(caches)
        self.length = length

    def release(self) -> None:
        self.caches, self.length = [], 0

    def _mha(self, attn: nn.Module, h: torch.Tensor, caches: tuple[torch.Tensor, ...], where: torch.Tensor):
        from attn2onnx.variants.base import split_heads

        k_cache, v_cache = caches
        n = attn.config.n_heads
        q, k, v = (split_heads(proj(h), n).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        k_cache.index_copy_(2, where, k)
        v_cache.index_copy_(2, where, v)
        end = int(where[-1]) + 1
        causal = h.shape[1] > 1  # a prefill chunk from an empty cache; one new token sees every key
        o = F.scaled_dot_product_attention(q, k_cache[:, :, :end], v_cache[:, :, :end], is_causal=causal)
        return attn.o_proj(o.transpose(1, 2).flatten(-2))

    def _dcmha(self, attn: nn.Module, h: torch.Tensor, caches: tuple[torch.Tensor, ...], where: torch.Tensor):
        positions = where.expand(h.shape[0], -1)
        q, k, v, q_factors, k_factors = attn._project(h, positions)
        for cache, new in zip(caches, (k, v, k_factors)):
            cache.index_copy_(1, where, new)
        end = int(where[-1]) + 1
        k, v, k_factors = (cache[:, :end] for cache in caches)
        mask = torch.ones(h.shape[0], end, dtype=torch.bool)
        return attn._attend(q, k, v, q_factors, k_factors, mask)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits [B,T,V] of ids [B,T] after the cached positions; the caches take the new rows."""
        lm, seq = self.lm, ids.shape[1]
        if seq > 1 and self.length:
            raise ValueError("StaticCacheLM takes several tokens from an empty cache only")
        where = torch.arange(self.length, self.length + seq)
        x = lm.embed(ids)
        if lm.pos is not None:
            x = x + lm.pos[where]
        attend = self._mha if lm.config.variant == "mha" else self._dcmha
        for block, caches in zip(lm.trunk.blocks, self.caches):
            x = x + attend(block.attn, block.norm1(x), caches, where)
            x = x + block.mlp(block.norm2(x))
        self.length += seq
        x = lm.norm(x)
        return F.linear(x, lm.embed.weight) if lm.head is None else lm.head(x)


def greedy_tokens(model: nn.Module, prompt: torch.Tensor, new: int, static: bool) -> torch.Tensor:
    """Greedy tokens [B,new] after ``prompt`` [B,T] with the static-cache step or with the
    growing-cache one (DecodeLM, caches grown by torch.cat), for checking one against the other."""
    from attn2onnx.models.decode import DecodeLM

    batch, length = prompt.shape
    tokens, ids = [], prompt
    with torch.inference_mode():
        if static:
            step = StaticCacheLM(model).eval()
            step.allocate(batch, length + new)
            for _ in range(new):
                tokens.append(step(ids)[:, -1].argmax(-1, keepdim=True))
                ids = tokens[-1]
            return torch.cat(tokens, 1)
        wrapper = DecodeLM(model).eval()
        past, done = wrapper.empty_past(batch), 0
        for _ in range(new):
            seq = ids.shape[1]
            mask = torch.ones(batch, done + seq, dtype=torch.int64)
            positions = torch.arange(done, done + seq).expand(batch, seq)
            logits, *past = wrapper(ids, mask, positions, *past)
            done += seq
            tokens.append(logits[:, -1].argmax(-1, keepdim=True))
            ids = tokens[-1]
    return torch.cat(tokens, 1)


# ---------------------------------------------------------------- runners
@dataclass
class Runner:
    """One engine's decode step (see the module docstring); ``weight_bytes``: what a step reads
    of its weights; ``cache_bytes(batch, context)``: of its caches."""

    prepare: Callable[[int, int], None]
    step: Callable[[], None]
    release: Callable[[], None]
    weight_bytes: int
    cache_bytes: Callable[[int, int], int]
    notes: list[str] = field(default_factory=list)


def time_calls(
    calls: int, call: Callable[[int], None], pick: Callable[[list[float]], float] = statistics.median
) -> float:
    """ms of ``call(i)`` for i in range(calls): the median (or what ``pick`` picks) of the calls."""
    samples = []
    for i in range(calls):
        start = time.perf_counter()
        call(i)
        samples.append(time.perf_counter() - start)
    return 1e3 * pick(samples)


def step_ms(runner: Runner, batch: int, context: int, steps: int) -> float:
    """The fastest of ``steps`` decode steps after ``context`` cached positions, in ms (one
    warm-up step first, untimed; the fastest because a loaded machine only ever adds time: with
    2 threads on 2 shared cores a step whose thread is descheduled waits tens of ms at a
    barrier); the caches are released afterwards."""
    runner.prepare(batch, context)
    try:
        runner.step()
        return time_calls(steps, lambda _: runner.step(), min)
    finally:
        runner.release()


def torch_weight_bytes(model: nn.Module) -> int:
    """fp32 bytes a step reads of a CausalLM's parameters: all but the learned position table
    (one row per token)."""
    skip = {id(model.pos)} if getattr(model, "pos", None) is not None else set()
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in skip)


def cache_spec_bytes(specs: list, batch: int, context: int) -> int:
    """fp32 bytes of ``context`` positions of every cache (a window cache: its limit)."""
    return sum(4 * int(np.prod(spec.shape(batch, context))) for spec in specs)


def onnx_weight_bytes(path: str | Path) -> int:
    """Bytes a step reads of a graph's initializers at the width they are stored at (int4 /
    int8 blocks and their scales for a quantized graph), leaving out tables it only gathers
    rows of (the learned positions, the embedding where the head has its own copy)."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    model = onnx.load(str(path), load_external_data=False)
    users: dict[str, list[tuple[str, int]]] = {}
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            users.setdefault(name, []).append((node.op_type, index))
    total = 0
    for tensor in model.graph.initializer:
        uses = users.get(tensor.name, [])
        if uses and all(op == "Gather" and index == 0 for op, index in uses):
            continue
        total += int(np.prod(tensor.dims, dtype=np.int64)) * tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return total


def eager_runner(model: nn.Module, static: bool, threads: int = THREADS) -> Runner:
    """PyTorch eager with ``threads`` intra-op threads: the static-cache step
    (:class:`StaticCacheLM`, buffers of context + 64 positions) or the growing one (DecodeLM,
    each step a torch.cat of every cache)."""
    from attn2onnx.models.decode import DecodeLM, cache_specs

    state: dict[str, Any] = {}
    ids = torch.randint(0, VOCAB, (1, 1), generator=torch.Generator().manual_seed(0))
    lm = StaticCacheLM(model).eval() if static else DecodeLM(model).eval()

    def prepare(batch: int, context: int) -> None:
        torch.set_num_threads(threads)
        generator = torch.Generator().manual_seed(0)
        state["ids"] = ids.expand(batch, 1).contiguous()
        if static:
            lm.allocate(batch, context + 64, context, generator)
        else:
            state["past"] = [torch.rand(p.shape, generator=generator) for p in lm.empty_past(batch, context)]
            state["length"] = context

    def step() -> None:
        with torch.inference_mode():
            if static:
                lm(state["ids"])
                return
            batch, length = state["ids"].shape[0], state["length"]
            mask = torch.ones(batch, length + 1, dtype=torch.int64)
            positions = torch.full((batch, 1), length, dtype=torch.int64)
            state["past"] = list(lm(state["ids"], mask, positions, *state["past"])[1:])
            state["length"] = length + 1

    def release() -> None:
        state.clear()
        torch.set_num_threads(THREADS)
        if static:
            lm.release()

    specs = cache_specs(model)
    return Runner(prepare, step, release, torch_weight_bytes(model), lambda b, c: cache_spec_bytes(specs, b, c))


def ort_past(session, batch: int, context: int, rng: np.random.Generator) -> list:
    """Random caches of ``context`` positions (a window cache: its limit) as ORT values, in the
    graph's cache order."""
    import onnxruntime as ort

    return [
        ort.OrtValue.ortvalue_from_numpy(rng.random(spec.shape(batch, context), dtype=np.float32))
        for spec in session.meta.caches
    ]


def ort_runner(path: str | Path, headroom: int = 64) -> Runner:
    """A decode graph run as `attn2onnx generate` runs it (DecodeSession, IO binding): growing
    caches in two reused buffers each, or shared buffers of context + ``headroom`` positions."""
    from attn2onnx.generate import DecodeSession

    session = DecodeSession(str(path), threads=THREADS)
    state: dict[str, Any] = {}

    def prepare(batch: int, context: int) -> None:
        rng = np.random.default_rng(0)
        if session.meta.shared:
            session.capacity = context + headroom
        session.past, session.length = ort_past(session, batch, context, rng), context
        state["ids"] = rng.integers(0, session.vocab_size, (batch, 1))

    def release() -> None:
        # DecodeSession keeps its buffers for the next sequence; a new context wants new ones.
        session.past, session._buffers, session._shared = [], [], []

    return Runner(
        prepare,
        lambda: session.step(state["ids"]),
        release,
        onnx_weight_bytes(path),
        lambda b, c: cache_spec_bytes(session.meta.caches, b, c),
    )


def genai_runner(folder: Path, cache_bytes: Callable[[int, int], int], steps: int) -> Runner:
    """A GenAI folder run by onnxruntime_genai: ``prepare`` prefills ``context`` random tokens
    (in chunks of GENAI_CHUNK at batch 1, one call otherwise: GenAI takes no cache from outside),
    a step is ``generate_next_token()`` (its greedy pick, then the model). EOS is held off
    (min_length = max_length) so no row stops."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    state: dict[str, Any] = {}

    def prepare(batch: int, context: int) -> None:
        ids = np.random.default_rng(0).integers(0, VOCAB, (batch, context)).astype(np.int32)
        params = og.GeneratorParams(model)
        length = context + steps + 4
        params.set_search_options(max_length=length, min_length=length, batch_size=batch)
        generator = og.Generator(model, params)
        chunk = GENAI_CHUNK if batch == 1 else context
        for start in range(0, context, chunk):
            generator.append_tokens(ids[:, start : start + chunk])
        state["generator"] = generator

    graph = next(p for p in (folder / "model.onnx", *folder.glob("*.onnx")) if p.exists())
    return Runner(
        prepare, lambda: state["generator"].generate_next_token(), state.clear, onnx_weight_bytes(graph), cache_bytes
    )


# ---------------------------------------------------------------- bandwidth
def read_gbps(megabytes: int = 512, tries: int = 5) -> float:
    """Memory read bandwidth with THREADS threads (GB/s): the fastest of ``tries`` torch sums
    over a buffer far larger than the L3 cache."""
    torch.set_num_threads(THREADS)
    data = torch.rand(megabytes * 2**20 // 4)
    return data.numel() * 4 / time_calls(tries, lambda _: data.sum(), min) / 1e6


@functools.lru_cache(maxsize=1)
def _matvec_session(megabytes: int) -> tuple[Any, dict, int]:
    """An ORT session multiplying one row by a [K, N] fp32 initializer of ``megabytes`` (MatMul,
    THREADS threads), its feed and the weight's bytes; built once per process."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k = 4096
    n = megabytes * 2**20 // 4 // k
    weight = numpy_helper.from_array(np.random.default_rng(0).random((k, n), dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "matvec",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        [weight],
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = THREADS, 1
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {"x": np.ones((1, k), np.float32)}
    session.run(None, feed)
    return session, feed, k * n * 4


def ort_matvec_gbps(megabytes: int = 256, tries: int = 3) -> float:
    """The rate ORT reads a weight at (GB/s): one row times a ``megabytes`` fp32 weight, the
    fastest of ``tries`` (a decode step's weight read, far larger than the L3 cache)."""
    session, feed, size = _matvec_session(megabytes)
    return size / time_calls(tries, lambda _: session.run(None, feed), min) / 1e6


__all__ = [
    "THREADS",
    "Runner",
    "StaticCacheLM",
    "build",
    "build_with_genai_builder",
    "cache_spec_bytes",
    "eager_runner",
    "genai_runner",
    "greedy_tokens",
    "onnx_weight_bytes",
    "ort_matvec_gbps",
    "ort_past",
    "ort_runner",
    "read_gbps",
    "set_genai_threads",
    "step_ms",
    "time_calls",
    "torch_weight_bytes",
    "write_llama_folder",
]
