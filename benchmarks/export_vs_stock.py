"""Export vs stock: one bare attention layer of every variant, B=1, D=512, N=8, T=256 and 1024.

For each variant and T, the layer (``ModelConfig(family="layer", ...)``, non-causal, seed 0,
max_len T) is timed three ways on the same input, all on the same number of threads:
  * ours    the graph ``attn2onnx.export`` writes (``to_onnx``: ai.attn2onnx nodes + their
            function bodies) in ORT through ``attn2onnx.runtime.session`` (native kernels
            registered; ops without one run their function bodies);
  * stock   ``to_onnx(custom=False)``: torch.onnx.export (dynamo) of the same module without
            attn2onnx's translation table, in ORT (``session(native=False)``, same threads);
  * eager   the PyTorch module (``torch.inference_mode``).
Both exports trace at batch 2, seq 16 with dynamic batch and seq (``seq <= T``), as attn2onnx
exports by default. Timing: after one warm-up call each, the three are timed in blocks (one
implementation at a time: idle ORT / OpenMP threads spin for a moment after a call and would
steal a core from an alternating neighbour), in 3 rounds of blocks so that a change of load on
the machine falls on all three alike; each block starts with an untimed call. Each gets at
least ``--min-runs`` calls and about ``--budget`` seconds (at most ``--max-runs`` calls); the
median is reported.
Max abs diff is each ORT output against eager on the timed input (all keys real).

    python benchmarks/export_vs_stock.py                     # every variant; updates RESULTS.md
    python benchmarks/export_vs_stock.py --variants mha,dcmha --seqs 256 --no-write
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import cpu_model, replace_section  # noqa: E402

import numpy as np

B, D, N = 1, 512, 8
EXPORT_SHAPE = (2, 16)  # batch 2: a batch-1 example would pin the batch dim to 1
SECTION = "## Export vs stock"


@dataclass
class Row:
    variant: str
    t: int
    ours_ms: float | None = None
    stock_ms: float | None = None
    eager_ms: float | None = None
    ours_nodes: str = ""  # "nodes (custom ops)"
    stock_nodes: str = ""
    ours_err: float | None = None
    stock_err: float | None = None
    ours_note: str = ""  # why there is no number
    stock_note: str = ""


def block_medians(
    calls: dict[str, Callable[[], object]], min_runs: int, max_runs: int, budget: float, rounds: int = 3
) -> dict[str, float]:
    """Median ms of each call. The calls are timed in blocks, one implementation at a time (an
    idle ORT or OpenMP thread pool keeps spinning for a moment after its last call, which would
    steal a core from the next implementation if calls alternated), in ``rounds`` rounds of
    blocks so that a change of load on the machine falls on every implementation alike. Each
    block starts with an untimed call; each implementation gets at least ``min_runs`` and about
    ``budget`` seconds of timed calls (at most ``max_runs``)."""
    for fn in calls.values():
        fn()  # first call: allocations, ORT arena growth, first-call dispatch
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate: no fixed neighbour
            fn = calls[name]
            fn()
            want = -(-min_runs * (r + 1) // rounds)  # ceil: min_runs spread over the rounds
            cap = -(-max_runs * (r + 1) // rounds)
            start = time.perf_counter()
            while len(times[name]) < cap and (len(times[name]) < want or time.perf_counter() - start < budget / rounds):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def reason(e: BaseException, limit: int = 300) -> str:
    text = (str(e).strip().splitlines() or [""])[0] or type(e).__name__
    text = f"{type(e).__name__}: {text}" if not text.startswith(type(e).__name__) else text
    text = text.replace("|", "/").replace("`", "'")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(proto) -> str:
    from attn2onnx import custom_ops

    custom = sorted({n.op_type for n in proto.graph.node if n.domain == custom_ops.DOMAIN})
    return f"{len(proto.graph.node)}" + (f" ({', '.join(custom)})" if custom else "")


def bench_one(
    variant: str,
    t: int,
    folder: Path,
    threads: int,
    min_runs: int,
    max_runs: int,
    budget: float,
    log: Callable[[str], None],
) -> Row:
    import onnx
    import torch

    from attn2onnx.exporter import to_onnx
    from attn2onnx.models import ModelConfig, build_model
    from attn2onnx.runtime import session
    from attn2onnx.sources import from_module

    row = Row(variant, t)
    model = build_model(ModelConfig(family="layer", variant=variant, d_model=D, heads=N, max_len=t, seed=0)).eval()
    source = from_module(model)
    example = source.example_inputs(*EXPORT_SHAPE)
    x = np.random.default_rng(1).standard_normal((B, t, D)).astype(np.float32)
    mask = np.ones((B, t), dtype=bool)
    xt, mt = torch.from_numpy(x), torch.from_numpy(mask)

    def eager():
        with torch.inference_mode():
            return model(xt, mt)

    reference = eager().numpy()
    calls: dict[str, Callable[[], object]] = {"eager": eager}
    for impl in ("ours", "stock"):
        custom = impl == "ours"
        try:
            proto = to_onnx(
                model, example, source.specs, output_names=source.output_names, max_seq=source.max_seq, custom=custom
            )
        except Exception as e:  # noqa: BLE001 - the failure itself is the result
            setattr(row, f"{impl}_note", f"{impl} export failed: {reason(e)}")
            log(f"{variant} T={t}: {impl} export failed: {reason(e)}")
            continue
        setattr(row, f"{impl}_nodes", describe(proto))
        path = folder / f"{variant}_{t}_{impl}.onnx"
        onnx.save(proto, path)
        try:
            sess = session(str(path), native=custom, threads=threads)
            feeds = {i.name: {"x": x, "key_padding_mask": mask}[i.name] for i in sess.get_inputs()}
            (out,) = sess.run(None, feeds)
        except Exception as e:  # noqa: BLE001
            setattr(row, f"{impl}_note", f"{impl} ORT failed: {reason(e)}")
            log(f"{variant} T={t}: {impl} ORT failed: {reason(e)}")
            continue
        setattr(row, f"{impl}_err", float(np.abs(out - reference).max()))
        calls[impl] = lambda sess=sess, feeds=feeds: sess.run(None, feeds)
    for impl, ms in block_medians(calls, min_runs, max_runs, budget).items():
        setattr(row, f"{impl}_ms", ms)
    log(
        f"{variant} T={t}: "
        + ", ".join(f"{impl} {getattr(row, f'{impl}_ms'):.1f} ms" for impl in calls)
        + f"; nodes {row.ours_nodes} / {row.stock_nodes or '-'}; max abs diff {row.ours_err} / {row.stock_err}"
    )
    return row


def fmt_ms(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}" if value < 1000 else f"{value:.0f}"


def table(rows: list[Row]) -> str:
    """The markdown table; why an export or a session failed goes in numbered notes below it."""
    notes: list[str] = []

    def cell(ms: float | None, note: str) -> str:
        if ms is not None:
            return fmt_ms(ms)
        if note not in notes:
            notes.append(note)
        return f"{note.split(':')[0]} [{notes.index(note) + 1}]"

    lines = [
        "| variant | T | ours ORT ms | stock ORT ms | eager ms | stock / ours | eager / ours | ours nodes "
        "(ai.attn2onnx ops) | stock nodes | max abs diff ours / stock |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for r in rows:
        speed_stock = f"{r.stock_ms / r.ours_ms:.2f}x" if r.stock_ms and r.ours_ms else ""
        speed_eager = f"{r.eager_ms / r.ours_ms:.2f}x" if r.eager_ms and r.ours_ms else ""
        errs = " / ".join("-" if e is None else f"{e:.1e}" for e in (r.ours_err, r.stock_err))
        lines.append(
            f"| {r.variant} | {r.t} | {cell(r.ours_ms, r.ours_note)} | {cell(r.stock_ms, r.stock_note)} | "
            f"{fmt_ms(r.eager_ms)} | {speed_stock} | {speed_eager} | {r.ours_nodes} | {r.stock_nodes or '-'} | {errs} |"
        )
    if notes:
        lines.append("")
        lines += [f"[{i}] {note}" + ("  " if i < len(notes) else "") for i, note in enumerate(notes, 1)]
    return "\n".join(lines)


def summary(rows: list[Row], margin: float = 0.1) -> list[str]:
    """One line per outcome: where our export beats stock by more than ``margin``, where it
    loses by more, and where the two are within it (noise: see the plain-PyTorch rows)."""
    groups: dict[str, list[str]] = {"faster": [], "slower": [], "same": [], "no stock": []}
    for r in rows:
        label = f"{r.variant} T={r.t}"
        if r.ours_ms is None or r.stock_ms is None:
            groups["no stock" if r.ours_ms is not None else "slower"].append(label)
        elif r.stock_ms > r.ours_ms * (1 + margin):
            groups["faster"].append(f"{label} ({r.stock_ms / r.ours_ms:.1f}x)")
        elif r.ours_ms > r.stock_ms * (1 + margin):
            groups["slower"].append(f"{label} ({r.stock_ms / r.ours_ms:.2f}x)")
        else:
            groups["same"].append(label)
    words = {
        "faster": f"ours faster than stock by more than {margin:.0%}",
        "slower": f"ours slower than stock by more than {margin:.0%} (or no number)",
        "same": f"within {margin:.0%}",
        "no stock": "no stock number (see notes)",
    }
    return [f"- {words[k]}: {', '.join(v)}" for k, v in groups.items() if v]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="", help="comma-separated variants (default: all)")
    parser.add_argument("--seqs", default="256,1024", help="comma-separated sequence lengths (default 256,1024)")
    parser.add_argument("--threads", type=int, default=2, help="torch and ORT intra-op threads (default 2)")
    parser.add_argument("--min-runs", type=int, default=5)
    parser.add_argument("--max-runs", type=int, default=50)
    parser.add_argument(
        "--budget", type=float, default=2.0, help="seconds of timed calls per implementation (after min-runs)"
    )
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = parser.parse_args(argv)

    import torch

    from attn2onnx.variants import VARIANTS

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()] or list(VARIANTS)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s): {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    seqs = [int(s) for s in args.seqs.split(",") if s.strip()]

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    load_start = os.getloadavg()[0]
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="export_vs_stock_") as tmp:
        for t in seqs:
            for variant in variants:
                rows.append(
                    bench_one(variant, t, Path(tmp), args.threads, args.min_runs, args.max_runs, args.budget, log)
                )
    minutes = (time.perf_counter() - start) / 60
    cmd = "python benchmarks/export_vs_stock.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = "\n".join(
        [
            SECTION,
            "",
            f'One bare attention layer per variant (`ModelConfig(family="layer")`, non-causal, all keys real), '
            f"B={B}, D={D}, N={N}, fp32, {args.threads} threads everywhere (torch.set_num_threads, ORT "
            "intra_op_num_threads). ours = `attn2onnx.export` in ORT via `attn2onnx.runtime.session` (native kernels "
            "registered; ops without a native kernel run their function bodies); stock = `to_onnx(custom=False)`, "
            "torch.onnx.export (dynamo) of the same module without attn2onnx's translation table, in ORT; eager = the "
            "PyTorch module. Both exports have dynamic batch and seq. Median wall time of repeated calls "
            "after a warm-up, "
            f"timed in blocks of one implementation, 3 rounds of blocks (at least {args.min_runs} calls, "
            f"about {args.budget:g} s "
            "each). "
            "Max abs diff: ORT output vs eager. mha, optimised and efficient are plain PyTorch (no attn2onnx op), so "
            "their two exports are the same graph: those rows show the measurement noise.",
            "",
            f"- command: `{cmd.strip()}`",
            f"- machine: {cpu_model()}, {os.cpu_count()} CPUs; load average {load_start:.1f} at the start, "
            f"{os.getloadavg()[0]:.1f} at the end (other jobs shared the machine when above ~0.5); "
            f"torch {torch.__version__}, onnxruntime {__import__('onnxruntime').__version__}; {minutes:.1f} min in all",
            "",
            table(rows),
            "",
            *summary(rows),
        ]
    )
    print(text)
    if not args.no_write:
        replace_section(SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
