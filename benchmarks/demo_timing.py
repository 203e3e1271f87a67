"""The demo's PyTorch-vs-ORT columns, measured the old way and the new way, several times over
(issue 22 item 3).

Old: each side timed on its own (one warm-up, median of 10 calls), PyTorch with its default
thread pool, ORT with its default. New (attn2onnx.demo): one intra-op thread each, 2 warm-up
rounds, then 10 rounds each calling both (interleaved, order alternating), median of each. The
model is the demo's: mha causal LM, 2 layers, d_model 64, 4 heads, batch 1 x 64 tokens, the
graph optimised for ORT. Each repeat gives both ways' PyTorch ms, ORT ms and their ratio; what
matters is how much the ratio swings between repeats on a loaded machine.

Usage: ``python benchmarks/demo_timing.py [--repeats 5] [--write]`` (``--write`` replaces the
section in RESULTS.md).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).parent))

from _results import cpu_model, replace_section  # noqa: E402

import attn2onnx  # noqa: E402
from attn2onnx.demo import ITERATIONS, TIMING_SHAPE, TIMING_THREADS, WARMUP  # noqa: E402
from attn2onnx.io_spec import random_inputs  # noqa: E402
from attn2onnx.models import ModelConfig, build_model  # noqa: E402
from attn2onnx.runtime import session  # noqa: E402
from attn2onnx.sources import from_module  # noqa: E402
from attn2onnx.timing import time_calls  # noqa: E402

HEADER = "## Demo timing: PyTorch vs ORT (benchmarks/demo_timing.py)"


def old_median_ms(fn: Callable[[], object], repeats: int = 10) -> float:
    """How the demo timed before: one warm-up call, median of ``repeats`` calls, alone."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--write", action="store_true", help="replace the section in RESULTS.md")
    args = parser.parse_args()
    model = build_model(ModelConfig(family="lm", variant="mha", layers=2, d_model=64, heads=4, max_len=128, seed=0))
    source = from_module(model)
    feeds = random_inputs(source.specs, *TIMING_SHAPE, seed=1)
    inputs = [torch.from_numpy(feeds[s.name]) for s in source.specs]
    default_threads = torch.get_num_threads()
    rows = []
    with tempfile.TemporaryDirectory() as folder, torch.inference_mode():
        names = source.output_names
        exported = attn2onnx.export(
            model, source.example_inputs(2, 16), Path(folder) / "m.onnx", specs=source.specs, output_names=names
        )
        path = str(Path(folder) / "m.opt.onnx")
        attn2onnx.optimize(exported.path, path, target="ort")
        for repeat in range(args.repeats):
            torch.set_num_threads(default_threads)
            sess = session(path)
            old = old_median_ms(lambda: model(*inputs)), old_median_ms(lambda: sess.run(None, feeds))
            torch.set_num_threads(TIMING_THREADS)
            sess = session(path, threads=TIMING_THREADS)
            calls = {"torch": lambda: model(*inputs), "ort": lambda: sess.run(None, feeds)}
            new = tuple(t.median_ms for t in time_calls(calls, WARMUP, ITERATIONS).values())
            rows.append((repeat + 1, *old, old[0] / old[1], *new, new[0] / new[1]))
            print(rows[-1], flush=True)
    lines = [
        HEADER,
        "",
        f"{datetime.date.today()}, {cpu_model()}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f} at the end (other jobs running). Old: each side alone, default threads "
        f"(PyTorch {default_threads}), median of 10; new (the demo now): {TIMING_THREADS} thread each, "
        f"{WARMUP} warm-up rounds, {ITERATIONS} interleaved rounds, medians. mha LM, 2 layers, d 64, "
        f"{TIMING_SHAPE[0]} x {TIMING_SHAPE[1]} tokens.",
        "",
        "| repeat | old PyTorch ms | old ORT ms | old ratio | new PyTorch ms | new ORT ms | new ratio |",
        "|---|---|---|---|---|---|---|",
        *(f"| {r[0]} | {r[1]:.2f} | {r[2]:.2f} | {r[3]:.1f}x | {r[4]:.2f} | {r[5]:.2f} | {r[6]:.1f}x |" for r in rows),
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        replace_section(HEADER, text)


if __name__ == "__main__":
    main()
