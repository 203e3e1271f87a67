"""The attention corpus (tests/corpus): per entry, what fuses and the stock export vs the
``ort``-optimised graph in ONNX Runtime (CPU provider), and writes the RESULTS.md section.

    python benchmarks/corpus.py                  # B=1, T=128, 1 thread
    python benchmarks/corpus.py --seq 256 --threads 2

ms per forward: best of interleaved runs (benchmarks/optimize.py's timer). "fails" = ORT refuses
to run the graph (torch exports SDPA / nn.MultiheadAttention padding masks as a [B,H|1,1,S]
Attention-23 mask, which ORT's CPU Attention rejects).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import onnx_ir as ir  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))  # before this folder: tests/corpus, not this script

import corpus  # noqa: E402
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--budget", type=float, default=0.3, help="seconds of timing per graph")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [
        "| entry | expected | stock graph | optimised graph | stock ms | optimised ms | speedup |",
        "|---|---|---|---|---|---|---|",
    ]
    for entry in corpus.ENTRIES:
        stock = corpus.export(entry, corpus.build(entry))
        opt = optimize_model(stock, target="ort")[0]
        feeds = corpus.inputs(entry, 1, args.seq)
        runners = {
            k: r
            for k, r in (("stock", _runner(stock, feeds, args.threads)), ("opt", _runner(opt, feeds, args.threads)))
            if r is not None
        }
        ms = interleaved(runners, args.budget, 200)
        fmt = {k: f"{ms[k]:.3f}" if k in ms else "fails" for k in ("stock", "opt")}
        speed = f"{ms['stock'] / ms['opt']:.2f}x" if len(ms) == 2 else "-"
        expected = "must not fuse" if entry.expected is None else ("gap: " + entry.gap if entry.gap else "fuses")
        rows.append(
            f"| {entry.name} ({entry.precision}) | {expected} | {_attention_ops(stock)} | {_attention_ops(opt)} "
            f"| {fmt['stock']} | {fmt['opt']} | {speed} |"
        )
        print(rows[-1], flush=True)
    text = "\n".join(
        [
            HEADER,
            "",
            f"`python benchmarks/corpus.py --seq {args.seq} --threads {args.threads}`; {cpu_model()}, "
            f"ORT {ort.__version__}, B=1 T={args.seq} D=32 H=4 (tiny: per-op overhead dominates), "
            "shared loaded machine. The corpus modules and their parity checks: tests/corpus, "
            "tests/test_corpus.py.",
            "",
        ]
        + rows
    )
    replace_section(HEADER, text)


if __name__ == "__main__":
    main()
