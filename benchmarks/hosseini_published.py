"""Hosseini & Hosseini's published PyTorch code (tests/corpus_hosseini): eager PyTorch vs its stock
export vs the ``ort``-optimised graph in ONNX Runtime (CPU provider), and the RESULTS.md section.

    python benchmarks/hosseini_published.py                       # D=512, 8 heads, T = max_len = 256 and 1024
    python benchmarks/hosseini_published.py --seq 256 --threads 1

Each module is the published head loop (softmax over queries) or its softmax-over-keys twin, exported
as that code must be: T static (= max_len, W_a is nn.Linear(max_len, max_len)), batch dynamic; run at
B=1. ms per forward: best of interleaved runs (benchmarks/optimize.py's timer), torch and ORT on the
same number of threads (ORT's threads not spinning: the machine is shared). Every optimised graph is
checked against eager first (max abs error in the table).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import onnx_ir as ir  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from corpus_hosseini import published_style as ps  # noqa: E402
from _results import cpu_model, replace_section  # noqa: E402
from optimize import interleaved  # noqa: E402

from attn2onnx.exporter import to_onnx  # noqa: E402
from attn2onnx.io_spec import InputSpec  # noqa: E402
from attn2onnx.passes import optimize_model  # noqa: E402
from attn2onnx.passes._ir_utils import count_ops  # noqa: E402

HEADER = "## Hosseini's published code"
D, HEADS = 512, 8
CASES = [  # (label, kind, shared W_a, softmax dim)
    ("optimised", "optimised", True, 1),
    ("optimised, keys", "optimised", True, -1),
    ("efficient", "efficient", True, 1),
    ("efficient, keys", "efficient", True, -1),
    ("super, shared W_a", "super", True, 1),
    ("super, shared W_a, keys", "super", True, -1),
    ("super, per-head W_a", "super", False, 1),
    ("super, per-head W_a, keys", "super", False, -1),
]

NOTES = """What the published code computes differently from the paper (read from
NMesaC/pay-better-attention-pytorch-keras, `pytorch_implementation/`; written out in
tests/corpus_hosseini/published_style.py):

- **Softmax over queries.** Each head applies `nn.Softmax(dim=1)` to its [B, T, T] scores, so
  every *key's column* sums to one; the paper (and attn2onnx's own variants) normalise over the
  keys. No fused attention kernel computes a softmax over queries.
- **W_a as an affine map over tokens.** Super's `W_a` is `nn.Linear(max_len, max_len)` applied to
  the head's values transposed, `V = W_a(v^T)^T`: a token mix with a bias per *token*, broadcast
  over the channels, and it only runs at T = max_len (the example's positions are
  `arange(max_len)` too), so the model is exported with a static T and a dynamic batch.
- **W_a per head.** `pytorch_attention_shared_wa.py` shares one `W_a` between the heads of a layer
  (its note says "for all attention layers", but each `MultiHeadAttention` builds its own);
  `pytorch_attention_indiv_wa.py` gives every head its own, N L^2 parameters instead of L^2.
- Per-head `nn.Linear(d_model, d_head)` query (and optimised key) projections with biases,
  xavier-uniform weights and zero biases (W_a included; attn2onnx's super starts at W_a = I);
  the scale is 1/sqrt(d_head) as in the paper; no mask, no causal option.

We fuse what the code computes, never what it meant: `passes/normalize_hosseini.py` turns the
per-head loop into one head-batched core (per-head projections packed, head slices replaced by
their source, W_a as the canonical super mix, so `fuse_super_mix` makes SuperMix: one for a shared
W_a, one per head otherwise). The softmax-over-keys twin (how users fix their copies) then lowers
onto com.microsoft.MultiHeadAttention with packed projections; the published softmax over queries
stays a batched `Softmax(axis=-2)` core, and `optimize --explain` reports each head's core as
"softmax over queries: no fused kernel". Parity for all of them: tests/test_hosseini_published.py.

Reading (run of 2026-11-30 on the loaded 2-core VM, load average 4-7): at this size the published
loop's per-head work is already large GEMMs, so batching it changes the graph (one core, one fused
op, no per-head loop) far more than the time: optimised vs stock stays within about +-30 % either
way, which is this machine's noise between reruns (a 1-thread rerun at T=256 gave 0.86x-1.40x). The
per-head-W_a super rows were slower optimised at T=1024 (0.72x, 0.79x): eight SuperMix nodes run
their standard-op bodies (slice, optional tril, row mask, MatMul) per head where the stock graph has
one MatMul each; not changed here. Eager PyTorch's own loop is 1.45x-2.44x slower than the
optimised graph at T=256; at T=1024 eager / optimised spans 0.61x-1.45x."""


def _export(module: torch.nn.Module, seq: int):
    specs = [InputSpec("x", ("batch", seq, D), "float")]
    return to_onnx(module, [torch.randn(2, seq, D)], specs, output_names=["y"])


def _session(graph, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # no spinning on a shared machine
    return ort.InferenceSession(graph.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _attention_ops(graph) -> str:
    ops = count_ops(ir.serde.deserialize_model(graph))
    keep = {k: v for k, v in ops.items() if k in ("Softmax", "Concat") or k.endswith(("Attention", "SuperMix"))}
    return ", ".join(f"{k.split('::')[-1]} x{v}" for k, v in sorted(keep.items())) or "-"


def measure(label: str, kind: str, shared: bool, dim: int, seq: int, threads: int, budget: float) -> str:
    """One table row: ops before / after, ms of eager, stock and optimised, and the ratios."""
    torch.manual_seed(0)
    module = ps.SelfAttention(kind, shared_wa=shared, softmax_dim=dim, n_heads=HEADS, d_model=D, max_len=seq).eval()
    stock = _export(module, seq)
    opt = optimize_model(stock, target="ort")[0]
    x = np.random.default_rng(0).standard_normal((1, seq, D)).astype(np.float32)
    feeds, xt = {"x": x}, torch.from_numpy(x)
    sessions = {"stock": _session(stock, threads), "opt": _session(opt, threads)}
    with torch.no_grad():
        expected = module(xt).numpy()
        err = float(np.abs(sessions["opt"].run(None, feeds)[0] - expected).max())

        def eager():
            return module(xt)

        ms = interleaved(
            {"eager": eager, **{k: (lambda s=s: s.run(None, feeds)) for k, s in sessions.items()}}, budget, 300
        )
    return (
        f"| {label} | {seq} | {_attention_ops(stock)} | {_attention_ops(opt)} | {ms['eager']:.1f} | {ms['stock']:.1f} "
        f"| {ms['opt']:.1f} | {ms['stock'] / ms['opt']:.2f}x | {ms['eager'] / ms['opt']:.2f}x | {err:.1e} |"
    )


def section(rows: list[str], seqs: list[int], threads: int) -> str:
    """The RESULTS.md section around the measured table rows."""
    command = f"python benchmarks/hosseini_published.py --seq {' '.join(map(str, seqs))} --threads {threads}"
    return "\n".join(
        [
            HEADER,
            "",
            f"Command: `{command}`",
            f"Machine: {cpu_model()}, {threads} threads (ORT intra-op and torch), shared loaded VM; "
            f"ORT {ort.__version__}, torch {torch.__version__}; date {datetime.date.today()}; D={D}, {HEADS} heads "
            '(d=64), B=1, T = max_len; ms = best of interleaved runs. Rows without "keys" are the published '
            "code (softmax over queries).",
            "",
            "| module | T | stock graph | optimised graph | eager ms | stock ms | optimised ms | stock / opt "
            "| eager / opt | max abs err |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            NOTES,
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[256, 1024], help="T = max_len")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of timing per runner")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for seq in args.seq:
        for case in CASES:
            rows.append(measure(*case, seq, args.threads, args.budget))
            print(rows[-1], flush=True)
    replace_section(HEADER, section(rows, args.seq, args.threads))


if __name__ == "__main__":
    main()
