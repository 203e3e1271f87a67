"""The onnxscript ORT fusion stage (passes/ort_stage.py): is it correct and not slower, and where
should it run in the ``ort`` pipeline?

    python benchmarks/ort_stage.py            # D=512, H=8, T=512, B=1, 2 threads; prints the RESULTS.md section
    python benchmarks/ort_stage.py --write    # ... and writes it

Two tables, ms per forward (best of interleaved runs, benchmarks/optimize.py's timer):

* whole models of this project (2 layers; encoder: LayerNorm + GELU MLP, lm: RMSNorm + SwiGLU):
  the pipeline without the stage vs with it last;
* corpus entries that onnxscript's rules fuse on the stock export (both rule sets want the same
  attention core): no stage, the stage last (on what ours left) and first (its fusions, then
  ours on the rest).

Every graph timed is checked against the pipeline's graph without the stage first (max abs diff).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnx_ir as ir  # noqa: E402
import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import corpus  # noqa: E402
from corpus import styles  # noqa: E402
from _results import cpu_model, replace_section  # noqa: E402
from optimize import interleaved, ort_runner  # noqa: E402

from attn2onnx import ModelConfig, build_model  # noqa: E402
from attn2onnx.exporter import to_onnx  # noqa: E402
from attn2onnx.io_spec import random_inputs  # noqa: E402
from attn2onnx.passes.ort_stage import OrtFusionStage  # noqa: E402
from attn2onnx.passes.pipeline import build_passes  # noqa: E402
from attn2onnx.sources import from_module  # noqa: E402

HEADER = "## onnxscript ORT fusion stage"
MODELS = [("mha", "encoder"), ("efficient", "encoder"), ("imhsa", "encoder"), ("mha", "lm"), ("dcmha", "lm")]
STAGE = "ort_fusions"


def run_passes(model: onnx.ModelProto, stage: str) -> tuple[onnx.ModelProto, dict]:
    """The ort pipeline with the onnxscript stage ``last`` (where pipeline.py runs it), ``first``
    (before our passes) or ``none``; the stage's fusion counts."""
    irm = ir.serde.deserialize_model(model)
    ort_stage = OrtFusionStage()
    passes = [p for name, p in build_passes("ort") if name != STAGE]
    passes = {"none": passes, "last": passes[:-1] + [ort_stage, passes[-1]], "first": [ort_stage] + passes}[stage]
    for p in passes:
        p(irm)
    return ir.serde.serialize_model(irm), ort_stage.counts


def compare(graphs: dict, feeds: dict, threads: int, budget: float, reps: int) -> tuple[dict, float]:
    """ms per graph (interleaved) and the largest output difference to graphs['none']."""
    runners = {k: ort_runner(g, feeds, threads, use_native=True) for k, g in graphs.items()}
    outs = {k: np.asarray(r()[0], dtype=np.float32) for k, r in runners.items()}
    diff = max(float(np.nanmax(np.abs(outs[k] - outs["none"]))) for k in graphs)
    return interleaved(runners, budget, reps), diff


def fusions(counts: dict) -> str:
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())) or "nothing"


def model_rows(args) -> list[str]:
    rows = []
    for variant, family in MODELS:
        torch.manual_seed(0)
        config = ModelConfig(
            family=family, variant=variant, d_model=args.d_model, heads=args.heads, layers=2,
            max_len=args.seq + 1, vocab_size=1000, num_classes=10,  # + 1: the encoder's CLS token
        )  # fmt: skip
        source = from_module(build_model(config))
        example = [torch.from_numpy(a) for a in random_inputs(source.specs, 1, 8, pad=False).values()]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stock = to_onnx(
                copy.deepcopy(source.module), example, source.specs, output_names=source.output_names,
                max_seq=source.max_seq,
            )  # fmt: skip
        (none, _), (last, counts) = run_passes(stock, "none"), run_passes(stock, "last")
        feeds = random_inputs(source.specs, args.batch, args.seq)
        ms, diff = compare({"none": none, "last": last}, feeds, args.threads, args.budget, args.reps)
        rows.append(
            f"| {variant} {family} | {fusions(counts)} | {ms['none']:.1f} | {ms['last']:.1f} | "
            f"{ms['none'] / ms['last']:.2f}x | {diff:.1e} |"
        )
        print(rows[-1], flush=True)
    return rows


def corpus_rows(args) -> list[str]:
    rows = []
    with styles.sized(args.d_model, args.heads, args.seq):
        for entry in corpus.ENTRIES:
            if entry.expected is None:
                continue
            stock = corpus.export(entry, corpus.build(entry))
            try:
                (none, _), (last, after), (first, counts) = (run_passes(stock, s) for s in ("none", "last", "first"))
            except Exception as err:  # noqa: BLE001 - an entry another pass cannot handle yet: say so, go on
                print(f"skipped {entry.name}: {type(err).__name__}: {err}", file=sys.stderr)
                continue
            if not counts:
                continue
            feeds = corpus.inputs(entry, args.batch, args.seq)
            graphs = {"none": none, "last": last, "first": first}
            ms, diff = compare(graphs, feeds, args.threads, args.budget, args.reps)
            rows.append(
                f"| {entry.name} | {fusions(counts)} | {fusions(after)} | {ms['none']:.1f} | {ms['last']:.1f} | "
                f"{ms['first']:.1f} | {ms['last'] / ms['first']:.2f}x | {diff:.1e} |"
            )
            print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of timing per graph")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--write", action="store_true", help="write the section into RESULTS.md")
    args = parser.parse_args(argv)
    size = f"D={args.d_model}, H={args.heads}, T={args.seq}, B={args.batch}, {args.threads} threads"
    section = [
        HEADER,
        "",
        f"`python benchmarks/ort_stage.py` ({size}; {cpu_model()}; ms per forward, best of interleaved runs; "
        "diff = max abs output difference to the pipeline without the stage).",
        "",
        "Whole models, the pipeline without the stage vs with it last (where `pipeline.py` runs it):",
        "",
        "| model | onnxscript fused | without (ms) | with (ms) | speedup | diff |",
        "|---|---|---|---|---|---|",
        *model_rows(args),
        "",
        "Corpus entries onnxscript's rules fuse on the stock export (both rule sets want the core): no stage, "
        "the stage last (on what our rules left) and first (its fusions, then ours on the rest):",
        "",
        "| entry | onnxscript fused first | ... last | none (ms) | last (ms) | first (ms) | first speedup | diff |",
        "|---|---|---|---|---|---|---|---|",
        *corpus_rows(args),
    ]
    text = "\n".join(section)
    print(text)
    if args.write:
        replace_section(HEADER, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
