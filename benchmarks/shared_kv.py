"""Shared KV buffers against growing caches (issue 21 item 1): one decode step of the mha LM of
benchmarks/generate.py (D=512, N=8, 4 layers, fp32, 2 threads), run as `attn2onnx generate`
runs it (attn2onnx.generate.DecodeSession), in

  * growing: the decode graph optimised for ORT (MultiHeadAttention with past / present: each
    step writes a present one position longer, a copy of every cache);
  * shared: the same graph with shared KV buffers (`export --decode --shared-kv`:
    GroupQueryAttention writing the new rows into one max-length buffer per cache in place);
  * dcmha growing: the dcmha LM of the same size, for reference (its caches are not shared yet).

Cells: batch 1 and 8, context 512 and 2048 (random caches of that many real positions; the
shared buffers sized up front so no step grows them). Every case is timed once per repetition,
repetitions interleaved in one process; median step within a repetition, median over
repetitions. The floor is the bytes a step must read (weights + caches, fp32) at the read
bandwidth measured in the same run.

    python benchmarks/shared_kv.py                  # prints, writes RESULTS.md "Decode: shared KV buffers"
    python benchmarks/shared_kv.py --contexts 512 --batches 1 --repeats 1 --no-write
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import cpu_model, replace_section  # noqa: E402
from generate import THREADS, build, ort_past, read_gbps, step_bytes, time_calls  # noqa: E402

SECTION = "## Decode: shared KV buffers"
IMPLS = ("mha growing", "mha shared", "dcmha growing")
MAX_LEN = 4096
READING = (
    "Reading: the shared form drops the per-step copy of every cache into a present one position longer, so it",
    "gains where the caches dominate the step (batch 8, long contexts); at batch 1 and short contexts a step reads",
    "the weights (12.6M fp32) and the two forms are within this machine's noise. dcmha has no shared form yet",
    "(DcmhaAttention has no in-place form; no standard-op form writes a graph input in place, so any would copy",
    "the caches as the growing graph does); its growing step tracks mha's growing step. The growing graph stays",
    "the default: the shared form covers mha, optimised and efficient only and changes the graph contract (caches",
    "become max-length buffers bound as both inputs and outputs).",
)


def graphs(folder: Path) -> tuple[dict[str, str], dict[str, torch.nn.Module]]:
    """The three graphs (and the two PyTorch models, for the floors)."""
    import attn2onnx
    from attn2onnx.models.decode import export_decode
    from attn2onnx.models.shared_decode import export_shared_decode

    paths, models = {}, {}
    for variant in ("mha", "dcmha"):
        torch.manual_seed(0)
        model = models[variant] = build(variant, MAX_LEN)
        growing = folder / f"{variant}.onnx"
        export_decode(model, growing)
        attn2onnx.optimize(growing, growing, target="ort")
        paths[f"{variant} growing"] = str(growing)
    export_shared_decode(models["mha"], folder / "mha.shared.onnx")
    paths["mha shared"] = str(folder / "mha.shared.onnx")
    return paths, models


def step_ms(session, batch: int, context: int, steps: int) -> float:
    """Median ms of one decode step after ``context`` random cached positions."""
    rng = np.random.default_rng(0)
    session.past, session.length = ort_past(session, batch, context, rng), context
    ids = rng.integers(0, session.vocab_size, (batch, 1))
    session.step(ids)  # warm-up; a shared session copies the caches into its buffers here
    ms = time_calls(steps, lambda _: session.step(ids))
    session.past = []
    return ms


def table(reps: dict, floors: dict, contexts: list[int], batches: list[int]) -> list[str]:
    lines = [
        "| batch | context | " + " | ".join(f"{i} (ms)" for i in IMPLS) + " | growing / shared | shared / floor |",
        "|---|---|" + "---|" * (len(IMPLS) + 2),
    ]
    for batch in batches:
        for context in contexts:
            ms = {impl: statistics.median(reps[(impl, batch, context)]) for impl in IMPLS}
            ratio = ms["mha growing"] / ms["mha shared"]
            floor = ms["mha shared"] / floors[(batch, context)]
            cells = " | ".join(f"{ms[i]:.2f}" for i in IMPLS)
            lines.append(f"| {batch} | {context} | {cells} | {ratio:.2f}x | {floor:.2f}x |")
    return lines


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=12, help="timed steps per case and repetition")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from attn2onnx.generate import DecodeSession

    args = parse(argv)
    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory() as folder:
        paths, models = graphs(Path(folder))
        capacity = max(args.contexts) + args.steps + 2
        sessions = {
            impl: DecodeSession(path, threads=THREADS, capacity=capacity if "shared" in impl else None)
            for impl, path in paths.items()
        }
        gbps = read_gbps()
        floors = {(b, c): step_bytes(models["mha"], b, c) / gbps / 1e6 for b in args.batches for c in args.contexts}
        reps: dict = {}
        for rep in range(args.repeats):
            for batch in args.batches:
                for context in args.contexts:
                    for impl in IMPLS:
                        ms = step_ms(sessions[impl], batch, context, args.steps)
                        reps.setdefault((impl, batch, context), []).append(ms)
            print(f"repetition {rep + 1}/{args.repeats} done", file=sys.stderr)
    lines = table(reps, floors, args.contexts, args.batches)
    command = " ".join(["python benchmarks/shared_kv.py", *(sys.argv[1:] if argv is None else argv)])
    body = [
        SECTION,
        "",
        f"`{command}` on {cpu_model()} ({os.cpu_count()} cores, shared with other jobs while it ran), "
        f"{THREADS} threads, fp32, mha / dcmha LM D=512 N=8 4 layers; read bandwidth {gbps:.1f} GB/s; "
        f"median of {args.repeats} interleaved repetitions of {args.steps} steps.",
        "",
        *lines,
        "",
        "Shared: `export --decode --shared-kv` (GroupQueryAttention over one max-length buffer per cache, bound as",
        "past and present, written in place). Floor: weights + caches read once at the measured bandwidth, which",
        "the load lowers (read the ratios, measured side by side). Load average at the end: "
        + ", ".join(f"{x:.1f}" for x in os.getloadavg())
        + ".",
        "",
        *READING,
    ]
    print("\n".join(body))
    if not args.no_write:
        replace_section(SECTION, "\n".join(body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
