"""Decode benchmark (issue 21 "Measure"): one decode step (one new token per row) of the same
LM in every engine, side by side in one process, 2 threads, against a competent eager baseline.

Models: mha and dcmha LMs (vocabulary 256, swiglu MLP, random weights) at D=512 (N=8, 4 layers)
and D=2048 (N=16, 2 layers), and for the GenAI anchor a transformers Llama of the D=512 size. Engines:

  * eager static: PyTorch eager with a static KV cache (buffers allocated once, new rows written
    in place, attention over the valid prefix: benchmarks/_decode_cells.StaticCacheLM, as
    transformers' StaticCache); its greedy tokens are checked equal to eager growing's;
  * eager growing: PyTorch eager with caches grown by torch.cat (models.decode.DecodeLM);
  * ORT growing / ORT shared: `attn2onnx export --decode` optimised for ORT / with `--shared-kv`,
    run as `attn2onnx generate` runs them (DecodeSession, IO binding);
  * int8 / int4: `attn2onnx quantize --weights int8|int4` of the shared graph (of the growing one
    where the variant has no shared form);
  * GenAI: the `export --decode --genai` folder run by onnxruntime_genai (generate_next_token);
  * GenAI builder (Llama only): onnxruntime_genai's model builder output for the same folder.

Per cell (model, batch B, context C) every engine gets C cached positions per row (random
contents, all real; GenAI prefills C random tokens), one warm-up step, then ``--steps`` timed
steps (``--long-steps`` past ``--long-tokens`` cached tokens): the fastest of them (a loaded machine
only adds time). Engines take turns within
a cell (the order rotates every repetition), only one engine's caches alive at a time; median
over ``--repeats`` repetitions. The floor of a step is what it must read (weights at their stored
width + every cached position) at the best read bandwidth measured in the run (torch sum over
512 MiB and an ORT MatMul of one row by a 256 MiB weight). The machine is shared: read the ratios.

    python benchmarks/generate.py            # prints, writes RESULTS.md "Decode", decode_step.png / .json
    python benchmarks/generate.py --quick    # small cells, prints only: a smoke test of the script
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _decode_cells import (  # noqa: E402
    THREADS,
    Runner,
    build,
    build_with_genai_builder,
    cache_spec_bytes,
    eager_runner,
    genai_runner,
    greedy_tokens,
    ort_matvec_gbps,
    ort_past,
    ort_runner,
    read_gbps,
    set_genai_threads,
    step_ms,
    time_calls,
    write_llama_folder,
)
from _results import cpu_model, replace_section  # noqa: E402

SECTION = "## Decode"
PROBE_SECTION = "## Decode: shared cache buffer probe"
PLOT = Path(__file__).with_name("decode_step.png")
RAW = Path(__file__).with_name("decode_step.json")
D_MODEL, HEADS, LAYERS = 512, 8, 4  # the D=512 models (and the one-layer probe's size)
WIDE_LAYERS = 2  # the D=2048 models: 100M parameters, each engine's copy 0.4 GB (the RAM is shared)
IMPLS = (
    "eager static",
    "eager static 1 thread",
    "eager growing",
    "ORT growing",
    "ORT shared",
    "int8",
    "int4",
    "GenAI",
    "GenAI builder",
)
ORT_IMPLS = IMPLS[3:]
__all__ = ["THREADS", "build", "ort_past", "read_gbps", "step_bytes", "time_calls"]  # benchmarks/shared_kv.py's


def step_bytes(model: torch.nn.Module, batch: int, context: int) -> int:
    """The least an fp32 decode step of ``model`` can read: every weight once and every cached
    position of every row once (benchmarks/shared_kv.py's floor)."""
    from _decode_cells import torch_weight_bytes

    from attn2onnx.models.decode import cache_specs

    return torch_weight_bytes(model) + cache_spec_bytes(cache_specs(model), batch, context)


# ---------------------------------------------------------------- shared-buffer probe
def attention_layer(op: str) -> bytes:
    """One decode-step attention layer (N=HEADS, D=D_MODEL, one new token, mask as an additive bias
    [B,1,1,P+1]): com.microsoft.MultiHeadAttention with a growing past/present (what
    passes/fuse_decode_attention.py emits) or GroupQueryAttention, whose present may share the past's
    max-length buffer (onnxruntime-genai's convention: the new row written in place)."""
    from onnx import TensorProto, helper

    d = D_MODEL // HEADS
    ms = "com.microsoft"
    if op == "MultiHeadAttention":
        inputs, attrs, past = ["q", "k", "v", "", "", "bias", "pk", "pv"], {}, "past"
    else:
        inputs, attrs, past = (
            ["q", "k", "v", "pk", "pv", "lens", "total", "", "", "", "bias"],
            {"kv_num_heads": HEADS},
            "max",
        )
    node = helper.make_node(op, inputs, ["o", "ok", "ov"], domain=ms, num_heads=HEADS, **attrs)
    f = TensorProto.FLOAT
    shapes = {"q": ["B", 1, D_MODEL], "k": ["B", 1, D_MODEL], "v": ["B", 1, D_MODEL], "bias": ["B", 1, 1, "S"]}
    shapes |= {"pk": ["B", HEADS, past, d], "pv": ["B", HEADS, past, d]}
    ins = [helper.make_tensor_value_info(n, f, shape) for n, shape in shapes.items()]
    if op != "MultiHeadAttention":
        ins += [helper.make_tensor_value_info("lens", TensorProto.INT32, ["B"])]
        ins += [helper.make_tensor_value_info("total", TensorProto.INT32, [])]
    outs = [helper.make_tensor_value_info(n, f, None) for n in ("o", "ok", "ov")]
    graph = helper.make_graph([node], op, ins, outs)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid(ms, 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def probe_layer(op: str, batch: int, context: int, steps: int) -> tuple[float, list[np.ndarray]]:
    """Min ms of one layer's decode step after ``context`` cached positions (rows left-padded by
    16 * row positions) and the outputs of every step; GQA's present is bound to its past buffer."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.log_severity_level = THREADS, 3
    sess = ort.InferenceSession(attention_layer(op), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    d, shared = D_MODEL // HEADS, op != "MultiHeadAttention"
    size = context + steps if shared else context
    past = []
    for _ in range(2):
        cache = np.zeros((batch, HEADS, size, d), np.float32)
        cache[:, :, :context] = rng.random((batch, HEADS, context, d), dtype=np.float32)
        past.append(ort.OrtValue.ortvalue_from_numpy(cache))
    times, outs = [], []
    for step in range(steps):
        total, new = context + step + 1, rng.random((batch, 1, D_MODEL), dtype=np.float32)
        bias = np.zeros((batch, 1, 1, total), np.float32)
        for row in range(batch):
            bias[row, ..., : 16 * row] = np.finfo(np.float32).min
        binding = sess.io_binding()
        for name, value in (("q", new), ("k", new), ("v", new), ("bias", bias)):
            binding.bind_cpu_input(name, value)
        binding.bind_ortvalue_input("pk", past[0])
        binding.bind_ortvalue_input("pv", past[1])
        binding.bind_output("o", "cpu")
        if shared:
            binding.bind_cpu_input("lens", np.full(batch, total - 1, np.int32))
            binding.bind_cpu_input("total", np.array(total, np.int32))
            binding.bind_ortvalue_output("ok", past[0])
            binding.bind_ortvalue_output("ov", past[1])
        else:
            binding.bind_output("ok", "cpu")
            binding.bind_output("ov", "cpu")
        start = time.perf_counter()
        sess.run_with_iobinding(binding)
        times.append(time.perf_counter() - start)
        got = binding.get_outputs()
        outs.append(got[0].numpy())
        past = past if shared else got[1:]
    return 1e3 * min(times[1:]), outs


def shared_buffer_probe(cases: list[tuple[int, int]], steps: int = 6) -> list[str]:
    """One attention layer, growing cache (MHA) against a shared max-length buffer (GQA): min ms
    of a step (each in a fresh process would be fairer; the two alternate here, MHA first) and
    the largest output difference over the steps (left-padded rows: the bias keeps them exact)."""
    lines = ["| B | context | MHA growing past/present ms | GQA shared buffer ms | MHA / GQA | max abs diff |"]
    lines.append("|---:|---:|---:|---:|---:|---:|")
    for batch, context in cases:
        mha_ms, mha_out = probe_layer("MultiHeadAttention", batch, context, steps)
        gqa_ms, gqa_out = probe_layer("GroupQueryAttention", batch, context, steps)
        diff = max(float(np.abs(a - b).max()) for a, b in zip(mha_out, gqa_out))
        lines.append(f"| {batch} | {context} | {mha_ms:.2f} | {gqa_ms:.2f} | {mha_ms / gqa_ms:.1f}x | {diff:.1e} |")
    return lines


def write_probe(args: argparse.Namespace, argv: list[str]) -> int:
    """Print the shared-buffer probe and write it as its own RESULTS.md section (PROBE_SECTION),
    so a rerun of the decode table does not drop it."""
    table = shared_buffer_probe([(b, c) for b in args.batches for c in args.contexts])
    text = "\n".join(
        [
            PROBE_SECTION,
            "",
            f"One decode-step attention layer (N={HEADS}, D={D_MODEL}, one new token, rows left-padded by 16 x row "
            "positions as an additive bias), min ms over the steps: com.microsoft.MultiHeadAttention with a growing "
            "past/present (what passes/fuse_decode_attention.py emits) against GroupQueryAttention writing the new row "
            "into a max-length buffer bound as both its past and its present (IO binding, onnxruntime-genai's "
            "past_present_share_buffer). The decode graphs keep the growing-cache contract (Optimum's); this probe "
            "measures what the other contract would gain on the attention alone. Not adopted: the caches would become "
            "max-length buffers bound as both inputs and outputs (a different graph contract from Optimum's), "
            "GroupQueryAttention is always causal, so a fully masked left-pad row at prefill is not uniform over all "
            "keys as the contract requires, and dcmha would need DcmhaAttention to write its new rows in place and "
            "read a valid length.",
            "",
            f"- command: `{' '.join(['python benchmarks/generate.py', *argv])}`",
            f"- date: {time.strftime('%Y-%m-%d')}; machine: {cpu_model()}, {os.cpu_count()} CPUs; "
            f"load average at the end {os.getloadavg()[0]:.1f}",
            "",
            *table,
        ]
    )
    print(text)
    if not args.no_write:
        replace_section(PROBE_SECTION, text)
    return 0


# ---------------------------------------------------------------- the table's models and cells
READING = (
    "Reading (this run, 2026-12-08): the load (load average 4-10 on 2 cores) decides more than the engines do. A "
    "2-thread step waits at every parallel op for a descheduled thread, so it inflates engines by how many ops they "
    "run: torch eager most (its 2-thread static step is 1.2x-7x its 1-thread one), then graphs with many nodes (our "
    "Llama export 180 nodes, the builder's 56). The D=512 rows ran under the heavier load, the D=2048 rows later "
    "under a lighter one, and the floor takes the run's best bandwidth (32 GB/s, as on an idle machine), so the "
    "floor ratios of the D=512 rows are the most inflated. What holds anyway: eager growing is 1.6x-27x eager "
    "static (the static cache is the baseline to beat); against eager static at 2 threads ORT shared reaches 5x in "
    "13 of the 19 cells the floor allows (missed: mha-512 at batch 1 and B=8 C=512, mha-2048 B=1 C=8192 and B=8 "
    "C=512), against eager static at 1 thread in 3 of 13 (dcmha at batch 8 and 2048+ tokens); int4 helps most where "
    "weights dominate (D=2048, batch 1: 1.7x-2.1x faster than ORT shared). No fp32 step is within 1.5x its floor "
    "(ORT shared 1.6x-10.6x, best repetitions 1.0x-7.3x). dcmha shared / mha shared is 0.55x-2.0x (6 of 11 cells <= "
    "1.2x); the dcmha shared graph reads its whole buffer each step (here context + 64 positions), so it tracks the "
    "buffer size, not the context. GenAI's builder output is 2.6x-16x faster than our export of the same Llama "
    "(`attn2onnx generate`) and 3.3x-17x faster than our GenAI folder: our Llama graph keeps growing caches "
    "(`--shared-kv` does not cover transformers folders), separate Q / K / V MatMuls and the Transpose / Reshape / "
    "RotaryEmbedding nodes around MultiHeadAttention, where the builder emits GroupQueryAttention on a shared "
    "buffer with fused QKV and SkipSimplifiedLayerNormalization; our GenAI folders are also limited by GenAI "
    'reallocating every growing present each step (section "Decode: ONNX Runtime GenAI"). Rerun on an idle machine '
    "before quoting absolute numbers."
)
BUILDER_REASON = (
    "the builder takes transformers folders of the architectures it lists, every one of which applies rotary "
    "positions inside attention; this LM adds a learned absolute position table to its embeddings (no RoPE) and "
    "has q/k/v/o biases, so no listed architecture holds the same weights: the Llama rows are the anchor"
)


@dataclass(frozen=True)
class Model:
    """One model of the table: ``variant`` mha / dcmha (ours) or llama (the GenAI anchor)."""

    name: str
    variant: str
    d_model: int
    heads: int
    layers: int
    wide: bool


def models_of(args: argparse.Namespace, every: bool = False) -> list[Model]:
    """The table's models (``--models`` picks some by name, e.g. mha-512 llama-512; ``every``:
    all of them)."""
    d, wide, layers, heads, wide_heads = (64, 128, 2, 4, 4) if args.quick else (D_MODEL, 2048, LAYERS, HEADS, 16)
    wide_layers = WIDE_LAYERS if not args.quick else layers
    models = [
        Model(f"mha-{d}", "mha", d, heads, layers, False),
        Model(f"dcmha-{d}", "dcmha", d, heads, layers, False),
        Model(f"mha-{wide}", "mha", wide, wide_heads, wide_layers, True),
        Model(f"dcmha-{wide}", "dcmha", wide, wide_heads, wide_layers, True),
        Model(f"llama-{d}", "llama", d, heads, layers, False),
    ]
    return [m for m in models if every or not args.models or m.name in args.models]


def cells_of(model: Model, args: argparse.Namespace) -> list[tuple[int, int]]:
    batches, contexts = (args.wide_batches, args.wide_contexts) if model.wide else (args.batches, args.contexts)
    if model.variant == "llama":
        contexts = args.anchor_contexts
    return [(b, c) for b in batches for c in contexts]


def max_len_of(args: argparse.Namespace) -> int:
    return max(args.contexts + args.wide_contexts) + 96


def genai_skip(model: Model, batch: int, context: int, args: argparse.Namespace) -> str | None:
    """Why GenAI is not timed in a cell (None: it is): GenAI takes no cache from outside, so
    each repetition prefills the context, whose cost past ``--genai-max-tflop`` (weights x tokens
    + attention) or whose attention probabilities past 2 GiB per layer (batch > 1 prefills in
    one call) the run does not pay."""
    tokens = batch * context
    flops = 2 * tokens * 12 * model.d_model**2 * model.layers + 4 * tokens * context * model.d_model * model.layers
    if flops > args.genai_max_tflop * 1e12:
        return f"prefill of {batch}x{context} tokens ~{flops / 1e12:.1f} TFLOP per repetition"
    probs = 4 * batch * model.heads * context * (context if batch > 1 else min(context, 1024))
    if probs > 2 * 2**30:
        return f"prefill attention probabilities {probs / 2**30:.0f} GiB per layer"
    return None


def memory_skip(cache_bytes: int, held_bytes: int, args: argparse.Namespace) -> str | None:
    """Why a cell is not run (None: it is): its caches at their peak (random past + a growing
    step's two buffers of up to twice the positions: 5x) beside the weights every engine holds
    past ``--mem-limit-gb`` (the machine's RAM is shared)."""
    peak = 5 * cache_bytes + held_bytes
    if peak > args.mem_limit_gb * 2**30:
        return f"~{peak / 2**30:.1f} GiB at its peak (limit {args.mem_limit_gb} GiB)"
    return None


def engines(
    model: Model, folder: Path, args: argparse.Namespace
) -> tuple[dict[str, Runner], dict[str, str], list[str]]:
    """The runners of ``model``'s engines, the reason for each engine it has none of, and notes
    (the token check; what was quantized)."""
    import attn2onnx
    from attn2onnx.genai import write_genai_folder
    from attn2onnx.models.decode import check_decodable, export_decode
    from attn2onnx.models.shared_decode import NOT_SHARED, SHARED_VARIANTS, share_decode_graph
    from attn2onnx.quantize import quant_mode, quantize_file
    from attn2onnx.sources import load_source

    runners: dict[str, Runner] = {}
    missing: dict[str, str] = {}
    notes: list[str] = []
    torch.manual_seed(0)
    if model.variant == "llama":
        hidden = attn2onnx.ModelConfig(family="lm", variant="mha", d_model=model.d_model, heads=model.heads).mlp_hidden
        hf = write_llama_folder(folder / "hf", model.d_model, model.heads, model.layers, hidden, max_len_of(args))
        lm = check_decodable(load_source(str(hf)).module)
        missing |= {impl: "ours only (the mha / dcmha rows)" for impl in IMPLS[:3]}
        missing["ORT shared"] = (
            f"`--shared-kv` covers this project's LMs ({', '.join(SHARED_VARIANTS)}), not transformers folders"
        )
        missing |= {impl: "not measured for the anchor" for impl in ("int8", "int4")}
    else:
        lm = build(model.variant, max_len_of(args), model.d_model, model.heads, model.layers)
        prompt = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
        same = torch.equal(greedy_tokens(lm, prompt, 24, static=True), greedy_tokens(lm, prompt, 24, static=False))
        notes.append(
            f"{model.name}: eager static's greedy tokens {'equal' if same else 'DIFFER FROM'} eager growing's "
            "(batch 2, 16-token prompt, 24 new tokens)"
        )
        runners["eager static"] = eager_runner(lm, static=True)
        runners["eager static 1 thread"] = eager_runner(lm, static=True, threads=1)
        runners["eager growing"] = eager_runner(lm, static=False)
    growing = folder / "growing.onnx"
    export_decode(lm, growing)
    attn2onnx.optimize(growing, growing, target="ort")
    runners["ORT growing"] = ort_runner(growing)
    base = growing
    if model.variant in SHARED_VARIANTS:
        base = folder / "shared.onnx"
        share_decode_graph(growing, base)
        runners["ORT shared"] = ort_runner(base)
    elif model.variant != "llama":
        missing["ORT shared"] = f"not yet: {NOT_SHARED.get(model.variant, 'no shared form')}"
        notes.append(f"{model.name}: int8 / int4 are the growing graph quantized (no shared form yet)")
    if model.variant != "llama":
        for weights in ("int8", "int4"):
            quantize_file(base, folder / f"{weights}.onnx", quant_mode(weights))
            runners[weights] = ort_runner(folder / f"{weights}.onnx")
    ours = write_genai_folder(growing, folder / "genai").path
    set_genai_threads(ours)
    runners["GenAI"] = genai_runner(ours, runners["ORT growing"].cache_bytes, args.steps + 2)
    if model.variant == "llama":
        head = model.d_model // model.heads
        kv_bytes = lambda b, c: 4 * 2 * model.layers * b * model.heads * c * head  # noqa: E731
        runners["GenAI builder"] = genai_runner(
            build_with_genai_builder(hf, folder / "builder"), kv_bytes, args.steps + 2
        )
    else:
        missing["GenAI builder"] = BUILDER_REASON
    return runners, missing, notes


def held_bytes(folder: Path) -> int:
    """What the engines of one model hold: every graph and weight file written for it (each
    is loaded once; the PyTorch model is about one more fp32 graph)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.suffix in (".onnx", ".data", ""))


# ---------------------------------------------------------------- the run
def log(began: float, text: str) -> None:
    print(f"[{(time.perf_counter() - began) / 60:.1f} min] {text}", file=sys.stderr, flush=True)


def measure_model(model: Model, args: argparse.Namespace, argv: list[str]) -> dict:
    """One model's cells, its engines taking turns in each; the raw results (RAW holds them)."""
    import resource

    out: dict = {"ms": {}, "bytes": {}, "skipped": {}, "gbps": []}
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        log(began, f"{model.name}: exporting")
        runners, out["missing"], out["notes"] = engines(model, Path(tmp), args)
        held = held_bytes(Path(tmp))
        cells = []
        for batch, context in cells_of(model, args):
            reason = memory_skip(max(r.cache_bytes(batch, context) for r in runners.values()), held, args)
            if reason:
                out["skipped"][f"B={batch} C={context}"] = reason
                continue
            cells.append((batch, context))
            for impl, runner in runners.items():
                out["bytes"][f"{impl}|{batch}|{context}"] = runner.weight_bytes + runner.cache_bytes(batch, context)
            reason = genai_skip(model, batch, context, args)
            if reason:
                out["skipped"][f"B={batch} C={context}, GenAI"] = reason
        order = list(runners)
        for rep in range(args.repeats):
            for batch, context in cells:
                out["gbps"] += [read_gbps(256, 3), ort_matvec_gbps()]
                steps = args.steps if batch * context <= args.long_tokens else args.long_steps
                for impl in order[rep % len(order) :] + order[: rep % len(order)]:
                    if impl.startswith("GenAI") and genai_skip(model, batch, context, args):
                        continue
                    ms = step_ms(runners[impl], batch, context, steps)
                    out["ms"].setdefault(f"{impl}|{batch}|{context}", []).append(ms)
                    gc.collect()
                log(began, f"{model.name} B={batch} C={context} repetition {rep + 1}/{args.repeats}")
        del runners
        gc.collect()
    out["command"] = " ".join(["python benchmarks/generate.py", *argv])
    out["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    out["load"] = [round(x, 1) for x in os.getloadavg()]
    out["minutes"] = round((time.perf_counter() - began) / 60, 1)
    out["max_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 1)
    return out


# ---------------------------------------------------------------- report
def med(values: list[float] | None) -> float:
    return statistics.median(values) if values else float("nan")


def fmt(x: float, unit: str = "") -> str:
    return "-" if x != x else f"{x:.2f}{unit}"


def span(xs: list[float]) -> str:
    xs = [x for x in xs if x == x]
    return f"{min(xs):.2f}x-{max(xs):.2f}x" if xs else "-"


class Table:
    """The medians and floors of the models in RAW, by (model, engine, batch, context)."""

    def __init__(self, results: dict, args: argparse.Namespace, pick=None, threads: int | None = None) -> None:
        """``pick``: what stands for an engine's repetitions (default their median); ``threads``:
        eager static's thread count as the baseline (default the faster of 2 and 1)."""
        self.results, self.args, self.pick, self.threads = results, args, pick or med, threads
        self.models = [m for m in models_of(args, every=True) if m.name in results]
        gbps = [g for r in results.values() for g in r["gbps"]]
        self.gbps = max(gbps) if gbps else float("nan")
        self.gbps_range = (min(gbps), max(gbps)) if gbps else (float("nan"),) * 2

    def ms(self, model: str, impl: str, b: int, c: int) -> float:
        """The median ms of ``impl``; for "eager static", the faster of its 2- and 1-thread runs."""
        if impl == "eager static":
            two, one = self.ms(model, "eager static 2 threads", b, c), self.ms(model, "eager static 1 thread", b, c)
            return {THREADS: two, 1: one}.get(self.threads, min(two, one))
        if impl == "eager static 2 threads":
            impl = "eager static"
        values = self.results.get(model, {}).get("ms", {}).get(f"{impl}|{b}|{c}")
        return self.pick(values) if values else float("nan")

    def floor(self, model: str, impl: str, b: int, c: int) -> float:
        n = self.results.get(model, {}).get("bytes", {}).get(f"{impl}|{b}|{c}")
        return float("nan") if n is None else n / self.gbps / 1e6

    def rows(self):
        """(model, batch, context) of every measured cell, in the table's order."""
        for model in self.models:
            cells = {tuple(map(int, key.split("|")[1:])) for key in self.results[model.name]["ms"]}
            for b, c in sorted(cells):
                yield model, b, c

    def step_lines(self) -> list[str]:
        lines = ["| model | B | context | " + " | ".join(f"{i} ms" for i in IMPLS) + " | floor fp32 ms |"]
        lines.append("|---|---:|---:|" + "---:|" * (len(IMPLS) + 1))
        for model, b, c in self.rows():
            cells = " | ".join(
                fmt(self.ms(model.name, "eager static 2 threads" if i == "eager static" else i, b, c)) for i in IMPLS
            )
            floor = fmt(self.floor(model.name, "ORT growing", b, c))
            lines.append(f"| {model.name} | {b} | {c} | {cells} | {floor} |")
        return lines

    def ratio_lines(self) -> list[str]:
        head = ["eager growing / static", "static / ORT growing", "static / ORT shared", "static / int4"]
        head += [f"{i} / floor" for i in ORT_IMPLS] + ["dcmha / mha (best ORT)"]
        lines = ["| model | B | context | " + " | ".join(head) + " |", "|---|---:|---:|" + "---:|" * len(head)]
        for model, b, c in self.rows():
            n, static = model.name, self.ms(model.name, "eager static", b, c)
            values = [
                self.ms(n, "eager growing", b, c) / static,
                static / self.ms(n, "ORT growing", b, c),
                static / self.ms(n, "ORT shared", b, c),
                static / self.ms(n, "int4", b, c),
                *(self.ms(n, i, b, c) / self.floor(n, i, b, c) for i in ORT_IMPLS),
                self.dcmha_ratio(model, b, c),
            ]
            lines.append(f"| {n} | {b} | {c} | " + " | ".join(fmt(v, "x") for v in values) + " |")
        return lines

    def best_ort(self, name: str, b: int, c: int) -> tuple[str, float]:
        """ORT shared where the model has it, else ORT growing: the graph a user would run."""
        shared = self.ms(name, "ORT shared", b, c)
        return ("ORT shared", shared) if shared == shared else ("ORT growing", self.ms(name, "ORT growing", b, c))

    def dcmha_ratio(self, model: Model, b: int, c: int) -> float:
        if model.variant != "dcmha":
            return float("nan")
        return self.best_ort(model.name, b, c)[1] / self.best_ort(model.name.replace("dcmha", "mha"), b, c)[1]

    def goal_lines(self) -> list[str]:
        ours = [(m, b, c) for m, b, c in self.rows() if m.variant != "llama"]
        name = lambda m, b, c: f"{m.name} B={b} C={c}"  # noqa: E731
        allowed, met, ratios = [], [], []
        for m, b, c in ours:
            impl, best = self.best_ort(m.name, b, c)
            static = self.ms(m.name, "eager static", b, c)
            ratios.append(static / best)
            if static >= 5 * self.floor(m.name, impl, b, c):
                allowed.append(name(m, b, c))
                met += [name(m, b, c)] if static >= 5 * best else []
        missed = [cell for cell in allowed if cell not in met]
        lines = [
            f"- ORT shared fp32 >= 5x eager static where the floor allows it: {span(ratios)} over {len(ours)} cells; "
            f"the floor allows it (eager static >= 5x floor) in {len(allowed)}, met in {len(met)}"
            + (f"; missed: {', '.join(missed)}" if missed else "")
            + f" -> {'met' if allowed and not missed else 'NOT met'}"
        ]
        b1 = [(m, b, c) for m, b, c in ours if b == 1]
        int4 = [self.ms(m.name, "eager static", b, c) / self.ms(m.name, "int4", b, c) for m, b, c in b1]
        lines.append(
            f"- int4 >= 5x eager static at batch 1: {span(int4)}; {sum(r >= 5 for r in int4)} of {len(int4)} "
            f"cells -> {'met' if int4 and min(int4) >= 5 else 'NOT met'}"
        )
        within, total, per = 0, 0, []
        for impl in ORT_IMPLS:
            xs = [self.ms(m.name, impl, b, c) / self.floor(m.name, impl, b, c) for m, b, c in self.rows()]
            xs = [x for x in xs if x == x]
            if xs:
                per.append(f"{impl} {span(xs)} ({sum(x <= 1.5 for x in xs)}/{len(xs)})")
                within, total = within + sum(x <= 1.5 for x in xs), total + len(xs)
        lines.append(
            f"- every ORT step within 1.5x its floor: {within} of {total}; "
            + "; ".join(per)
            + f" -> {'met' if total and within == total else 'NOT met'}"
        )
        dc = [self.dcmha_ratio(m, b, c) for m, b, c in ours if m.variant == "dcmha"]
        lines.append(
            f"- dcmha step <= 1.2x mha step (ORT shared each): {span(dc)}, "
            f"{sum(x <= 1.2 for x in dc if x == x)} of {sum(x == x for x in dc)} cells -> "
            f"{'met' if dc and max(dc) <= 1.2 else 'NOT met'}"
        )
        anchor = [(m, b, c) for m, b, c in self.rows() if m.variant == "llama"]
        vs = [self.ms(m.name, "ORT growing", b, c) / self.ms(m.name, "GenAI builder", b, c) for m, b, c in anchor]
        genai = [self.ms(m.name, "GenAI", b, c) / self.ms(m.name, "GenAI builder", b, c) for m, b, c in anchor]
        lines.append(
            f"- ours within 1.1x of GenAI's model builder (the Llama, same weights): our graph as `attn2onnx "
            f"generate` runs it / the builder's in GenAI {span(vs)}; our GenAI folder / the builder's, both in GenAI "
            f"{span(genai)} -> {'met' if vs and max(vs) <= 1.1 else 'NOT met'}"
        )
        return lines


def plot(table: Table, path: Path) -> None:
    """Step time against context: one panel per model and batch, one line per engine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [m.name for m in table.models]
    panels = sorted({(m.name, b) for m, b, _ in table.rows()}, key=lambda p: (names.index(p[0]), p[1]))
    cols = 2
    fig, axes = plt.subplots(-(-len(panels) // cols), cols, figsize=(6 * cols, 3.6 * -(-len(panels) // cols)))
    axes = np.atleast_1d(axes).reshape(-1)
    for ax, (name, b) in zip(axes, panels):
        contexts = sorted({c for m, bb, c in table.rows() if m.name == name and bb == b})
        for index, impl in enumerate(IMPLS):
            shown = "eager static 2 threads" if impl == "eager static" else impl
            ms = [table.ms(name, shown, b, c) for c in contexts]
            if any(m == m for m in ms):
                ax.plot(contexts, ms, marker="o", color=f"C{index}", label=shown)
        floors = [table.floor(name, "ORT growing", b, c) for c in contexts]
        ax.plot(contexts, floors, linestyle=":", color="black", label="floor fp32")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{name}, batch {b}", fontsize=9)
        ax.set_xlabel("context (cached tokens)", fontsize=8)
        ax.set_ylabel("ms per step", fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    for ax in axes[len(panels) :]:
        ax.axis("off")
    fig.suptitle(f"decode step, {THREADS} threads, on a loaded shared machine: read the ratios", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def method_lines() -> list[str]:
    """The module docstring's models, engines and method as markdown (one line per paragraph or item)."""
    paragraphs = __doc__.split("\n\n")
    engines = paragraphs[2].replace("\n    ", " ").split("\n")
    return [
        paragraphs[1].replace("\n", " "),
        "",
        *(line.strip().replace("* ", "- ", 1) for line in engines),
        "",
        paragraphs[3].replace("\n", " "),
    ]


def report(results: dict, args: argparse.Namespace) -> str:
    import onnxruntime
    import onnxruntime_genai

    table = Table(results, args)
    runs = [
        f"  - {name}: `{r['command']}`, {r['date']}, {r['minutes']} min, load average at the end "
        f"{', '.join(map(str, r['load']))}, peak RSS {r['max_rss_gib']} GiB"
        for name, r in results.items()
    ]
    missing = [
        f"- {name}: " + "; ".join(f"{impl}: {why}" for impl, why in r["missing"].items() if impl != "GenAI builder")
        for name, r in results.items()
        if any(impl != "GenAI builder" for impl in r["missing"])
    ]
    skipped = [f"- {name} {cell}: {why}" for name, r in results.items() for cell, why in r["skipped"].items()]
    low, high = table.gbps_range
    return "\n".join(
        [
            SECTION,
            "",
            *method_lines(),
            "",
            f"- machine: {cpu_model()}, {os.cpu_count()} CPUs, 32 MiB L3, shared with other jobs (load averages "
            "below: several times the 2 cores), so the absolute times are several times an idle machine's: read the "
            f"ratios, measured side by side; onnxruntime {onnxruntime.__version__}, onnxruntime-genai "
            f"{onnxruntime_genai.__version__}, torch {torch.__version__}, {THREADS} threads everywhere",
            f"- floor bandwidth: {table.gbps:.1f} GB/s, the best reading of the run (every cell of every repetition "
            f"reads once: {low:.1f}-{high:.1f} GB/s under the load)",
            f"- plot: `{PLOT.name}`; raw times and bytes: `{RAW.name}`",
            "- runs (one per model; `--merge` keeps the other models' results):",
            *runs,
            "",
            *table.step_lines(),
            "",
            *table.ratio_lines(),
            "",
            "static = eager static at the faster of 2 threads and 1 thread (under this load torch's 2 threads wait "
            "on each other at every op: often 2-4x slower than 1; ORT runs 2 threads throughout); floor = each "
            "engine's own (its weights at their stored width). The D=512 int8 / int4 weights (13 / 7 MB) fit the "
            "32 MiB L3 cache, so those steps could beat a DRAM floor.",
            "",
            f"Goals (issue 21), against eager static at {THREADS} threads as the issue states them (medians):",
            "",
            *Table(results, args, threads=THREADS).goal_lines(),
            "",
            "The same against eager static at its faster thread count (medians):",
            "",
            *table.goal_lines(),
            "",
            "And against eager static at its faster thread count with each engine's best repetition instead of "
            "the median (the load varies between repetitions far more than between an engine's steps):",
            "",
            *Table(results, args, min).goal_lines(),
            "",
            "Not measured:",
            "",
            *skipped,
            *missing,
            f"- GenAI builder for mha / dcmha: {BUILDER_REASON}",
            "",
            "Checks:",
            "",
            *[f"- {note}" for r in results.values() for note in r["notes"]],
            "",
            READING,
        ]
    )


# ---------------------------------------------------------------- main
def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small models and cells, prints only (a smoke test)")
    parser.add_argument("--models", nargs="+", help="only these models (e.g. mha-512 llama-512)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--wide-contexts", type=int, nargs="+", default=[512, 2048, 8192], help="D=2048's")
    parser.add_argument("--wide-batches", type=int, nargs="+", default=[1, 8], help="D=2048's")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per engine, cell and repetition")
    parser.add_argument("--long-steps", type=int, default=3, help="timed steps where batch x context > --long-tokens")
    parser.add_argument("--long-tokens", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=3, help="repetitions (engines take turns within each)")
    parser.add_argument("--mem-limit-gb", type=float, default=8.0, help="skip a cell whose peak would pass this")
    parser.add_argument("--genai-max-tflop", type=float, default=1.0, help="skip GenAI where its prefill costs more")
    parser.add_argument("--anchor-contexts", type=int, nargs="+", default=[512, 2048], help="the Llama's")
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md and the plot alone")
    parser.add_argument("--merge", action="store_true", help="keep the results of the models not run (from RAW)")
    parser.add_argument("--report-only", action="store_true", help="run nothing: the table and plot from RAW")
    parser.add_argument(
        "--probe-shared-buffer",
        action="store_true",
        help="print only the one-layer MHA (growing cache) vs GQA (shared buffer) probe at --batches x --contexts",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.contexts, args.batches, args.wide_contexts, args.wide_batches = [32, 96], [1, 2], [32], [1]
        args.anchor_contexts = [32]
        args.steps, args.long_steps, args.repeats, args.no_write = 2, 2, 1, True
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.probe_shared_buffer:
        return write_probe(args, argv)
    torch.set_num_threads(THREADS)
    results = json.loads(RAW.read_text()) if (args.merge or args.report_only) and RAW.exists() else {}
    for model in [] if args.report_only else models_of(args):
        results[model.name] = measure_model(model, args, argv)
        if not args.no_write:  # each model as it is done: a later failure keeps it
            RAW.write_text(json.dumps(results, indent=1) + "\n")
    text = report(results, args)
    print(text)
    if not args.no_write:
        replace_section(SECTION, text)
        plot(Table(results, args), PLOT)
        print(f"updated RESULTS.md and {PLOT.name}" + ("" if args.report_only else f" and {RAW.name}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
