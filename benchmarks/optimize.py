"""Benchmark the graph passes: per variant, PyTorch eager vs the stock export in ORT vs our export
unoptimised vs optimised (target ort), plus DCMHA written in plain PyTorch (tests/plain_dcmha.py)
exported with the stock exporter vs the same graph after the DCMHA fusion.

    python benchmarks/optimize.py                       # B=1 D=512 N=8, T=256 and 1024, 2 threads
    python benchmarks/optimize.py --seqs 4096 --variants mha efficient dcmha plain-dcmha

Prints a markdown table (best of N interleaved runs, ms per forward; x = speedup). ORT sessions register the native
kernel library when it is built (attn2onnx.runtime.native), else the function bodies run.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings

# torch's OpenMP threads otherwise busy-wait between calls, which on a shared machine slows
# every other process (and torch itself) down
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from attn2onnx.exporter import to_onnx  # noqa: E402
from attn2onnx.io_spec import InputSpec  # noqa: E402
from attn2onnx.passes import optimize_model  # noqa: E402
from attn2onnx.runtime import native  # noqa: E402
from attn2onnx.runtime.sessions import session_options  # noqa: E402
from attn2onnx.variants import VARIANTS, build_attention  # noqa: E402

DEFAULT_VARIANTS = [v for v in VARIANTS if v != "reuse"] + ["plain-dcmha"]


def interleaved(runners: dict, budget_s: float, max_reps: int) -> dict:
    """Best (minimum) milliseconds of each runner, timed in interleaved rounds after one warm-up
    call each: the machine is shared, and interleaving gives every runner the same share of the
    other processes' load, the minimum being the figure least disturbed by them."""
    for fn in runners.values():
        fn()
    times: dict = {name: [] for name in runners}
    start = time.perf_counter()
    rounds = 0
    while rounds < 3 or (time.perf_counter() - start < budget_s * len(runners) and rounds < max_reps):
        for name, fn in runners.items():
            t = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t) * 1000)
        rounds += 1
    return {name: min(ts) for name, ts in times.items()}


def build(name: str, d_model: int, heads: int, seq: int) -> torch.nn.Module:
    if name == "plain-dcmha":
        from plain_dcmha import DcformerStyle

        return DcformerStyle(d_model=d_model, n_heads=heads, rank=2, seed=0).eval()
    options = dict(d_model=d_model, n_heads=heads)
    if name == "super":
        options["max_len"] = max(seq, 256)
    if name == "imhsa":
        options["landmarks"] = 16
    return build_attention(name, **options).eval()


def export(module, seq: int, d_model: int, custom: bool) -> onnx.ModelProto:
    x = torch.randn(2, min(seq, 16), d_model)  # batch 2: batch 1 would be specialised away
    kpm = torch.ones(2, min(seq, 16), dtype=torch.bool)
    specs = [
        InputSpec("x", ("batch", "seq", d_model), "float"),
        InputSpec("key_padding_mask", ("batch", "seq"), "mask"),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return to_onnx(
            module,
            (x, kpm),
            specs,
            output_names=["y"],
            custom=custom,
            max_seq=seq if isinstance(module, torch.nn.Module) and hasattr(module, "wa") else None,
        )


def ort_runner(model: onnx.ModelProto, feeds: dict, threads: int, use_native: bool):
    """A session whose idle threads do not spin (sessions are timed in turns, and a spinning
    pool would steal the cores from the next one)."""
    import onnxruntime as ort

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        options = session_options(native_kernels=use_native, threads=threads)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return lambda: sess.run(None, feeds)


def bench_variant(name: str, seq: int, args) -> dict:
    torch.manual_seed(0)
    module = build(name, args.d_model, args.heads, seq)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, seq, args.d_model)).astype(np.float32)
    kpm = np.ones((args.batch, seq), dtype=bool)
    feeds = {"x": x, "key_padding_mask": kpm}
    tx, tk = torch.from_numpy(x), torch.from_numpy(kpm)
    row: dict = {"variant": name, "T": seq}

    def eager():
        with torch.inference_mode():
            module(tx, tk)

    # eager is timed on its own: torch's OpenMP threads keep spinning after a call
    row.update(interleaved({"eager": eager}, args.budget, args.max_reps))
    runners: dict = {}
    use_native = native.available()
    try:
        stock = export(module, seq, args.d_model, custom=False)
    except Exception as err:  # noqa: BLE001 - the stock exporter cannot take every reference
        row["stock"], row["note"] = None, f"stock export failed ({type(err).__name__})"
    else:
        runners["stock"] = ort_runner(stock, feeds, args.threads, False)
    if name == "plain-dcmha":
        ours = stock  # the user's own export: the passes start from it
        row["ours"] = None
    else:
        ours = export(module, seq, args.d_model, custom=True)
        runners["ours"] = ort_runner(ours, feeds, args.threads, use_native)
    optimised, report = optimize_model(ours, target="ort")
    runners["optimised"] = ort_runner(optimised, feeds, args.threads, use_native)
    row.update(interleaved(runners, args.budget, args.max_reps))
    row["fused"] = "; ".join(f"{k} x{v}" for p in report.passes for k, v in p["fused"].items()) or "-"
    # check the optimised graph against eager once
    with torch.inference_mode():
        expected = module(tx, tk).numpy()
    got = runners["optimised"]()[0]
    row["max_err"] = float(np.abs(got - expected).max())
    return row


def fmt(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    parser.add_argument("--seqs", nargs="+", type=int, default=[256, 1024])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--budget", type=float, default=2.0, help="seconds of timed runs per runner (at least 3 interleaved rounds)"
    )
    parser.add_argument("--max-reps", type=int, default=20)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    print(
        f"B={args.batch} D={args.d_model} N={args.heads}, {args.threads} threads, torch {torch.__version__}, "
        f"onnxruntime {__import__('onnxruntime').__version__}, native kernels: {native.available()}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    )
    print()
    print(
        "| variant | T | eager ms | stock ORT ms | ours unopt ms | optimised ms | opt vs eager | opt vs "
        "unopt | opt vs stock | fused | max err |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for seq in args.seqs:
        for name in args.variants:
            try:
                r = bench_variant(name, seq, args)
            except Exception as err:  # noqa: BLE001 - one failing cell must not hide the others
                print(f"| {name} | {seq} | failed: {type(err).__name__}: {str(err)[:120]} |", flush=True)
                continue
            base = r["ours"] if r["ours"] is not None else r["stock"]
            vs_stock = "-" if r["stock"] is None else f"{r['stock'] / r['optimised']:.2f}x"
            print(
                f"| {name} | {seq} | {fmt(r['eager'])} | {fmt(r['stock'])} | {fmt(r['ours'])} | "
                f"{fmt(r['optimised'])} | "
                f"{r['eager'] / r['optimised']:.2f}x | {base / r['optimised']:.2f}x | {vs_stock} | "
                f"{r['fused']}{' (' + r['note'] + ')' if 'note' in r else ''} | {r['max_err']:.1e} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
