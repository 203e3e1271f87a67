"""The attention corpus (tests/corpus): per entry, what fuses and the stock export vs the
``ort``-optimised graph in ONNX Runtime (CPU provider) at realistic sizes, and writes the
RESULTS.md section.

    python benchmarks/corpus.py                                   # D=512, H=8, T 512 / 2048, B 1 / 4, 2 threads
    python benchmarks/corpus.py --seq 128 --batch 1 --d-model 32 --heads 4 --threads 1   # the tiny size

The near misses are left out (they never fuse: stock = optimised). ms per forward: best of
interleaved runs (benchmarks/optimize.py's timer), stock and optimised alternating. "fails" = ORT
refuses to run the graph (torch exports SDPA / nn.MultiheadAttention padding masks as a
[B,H|1,1,S] Attention-23 mask, which ORT's CPU Attention rejects).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import onnx_ir as ir  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))  # before this folder: tests/corpus, not this script

import corpus  # noqa: E402
from corpus import styles  # noqa: E402
from _results import cpu_model, replace_section  # noqa: E402
from optimize import interleaved  # noqa: E402

from attn2onnx.passes import optimize_model  # noqa: E402
from attn2onnx.passes._ir_utils import count_ops  # noqa: E402

HEADER = "## Attention corpus: stock export vs optimised"


def _runner(graph, feeds: dict, threads: int):
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    opts.intra_op_num_threads = threads
    try:
        sess = ort.InferenceSession(graph.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        sess.run(None, feeds)
    except Exception:  # noqa: BLE001 - ORT raises its own Fail types
        return None
    return lambda: sess.run(None, feeds)


def _attention_ops(graph) -> str:
    ops = count_ops(ir.serde.deserialize_model(graph))
    keep = {k: v for k, v in ops.items() if k == "Softmax" or k.endswith("Attention")}
    return ", ".join(f"{k.split('::')[-1]} x{v}" for k, v in sorted(keep.items())) or "-"


def _cell(ms: dict) -> str:
    if len(ms) < 2:
        return " / ".join(f"{ms[k]:.1f}" if k in ms else "fails" for k in ("stock", "opt")) + " (-)"
    return f"{ms['stock']:.1f} / {ms['opt']:.1f} ({ms['stock'] / ms['opt']:.2f}x)"


def measure(entry: corpus.Entry, shapes: list[tuple[int, int]], args) -> str:
    """One table row: the entry's graphs and, per (batch, seq), stock / optimised ms (speedup)."""
    stock = corpus.export(entry, corpus.build(entry))
    opt = optimize_model(stock, target="ort")[0]
    cells = []
    for batch, seq in shapes:
        feeds = corpus.inputs(entry, batch, seq)
        runners = {
            k: r
            for k, r in (("stock", _runner(stock, feeds, args.threads)), ("opt", _runner(opt, feeds, args.threads)))
            if r
        }
        cells.append(_cell(interleaved(runners, args.budget, args.reps)))
    return (
        f"| {entry.name} ({entry.precision}) | {_attention_ops(stock)} | {_attention_ops(opt)} | "
        + " | ".join(cells)
        + " |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget", type=float, default=0.5, help="seconds of timing per graph and shape")
    parser.add_argument("--reps", type=int, default=20, help="at most this many interleaved rounds")
    parser.add_argument("--only", nargs="*", default=None, help="entry names (default: every standard entry)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    shapes = [(b, t) for t in args.seq for b in args.batch]
    entries = [e for e in corpus.ENTRIES if e.expected is not None and (not args.only or e.name in args.only)]
    rows = [
        "| entry | stock graph | optimised graph | " + " | ".join(f"B={b} T={t}" for b, t in shapes) + " |",
        "|---|---|---|" + "---|" * len(shapes),
    ]
    with styles.sized(args.d_model, args.heads, max(max(args.seq), styles.MAX_LEN)):
        for entry in entries:
            rows.append(measure(entry, shapes, args))
            print(rows[-1], flush=True)
    load = os.getloadavg()[0]
    command = " ".join(["python benchmarks/corpus.py"] + sys.argv[1:])
    text = "\n".join(
        [
            HEADER,
            "",
            f"`{command}`; {datetime.date.today()}, {cpu_model()}, ORT {ort.__version__}, D={args.d_model} "
            f"H={args.heads} (d={args.d_model // args.heads}), {args.threads} threads, fp32 unless said; shared "
            f"machine (load average at the end {load:.1f}). Cells: stock ms / optimised ms (speedup), the best of "
            "interleaved runs. The corpus modules and their parity checks: tests/corpus, tests/test_corpus.py.",
            "",
        ]
        + rows
    )
    replace_section(HEADER, text)


if __name__ == "__main__":
    main()
