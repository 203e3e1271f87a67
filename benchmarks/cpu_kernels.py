"""CPU kernels: one DCMHA layer (B=1, D=512, N=8, d=64, R=2, causal) on 2 threads.

Compares, at T = 1024 and 4096:
  * ours      attn2onnx export (one ai.attn2onnx::DcmhaAttention node) in ORT with the native
              kernel library registered;
  * body      the same model in ORT without the library (the op's standard-op function body);
  * eager     the PyTorch module (eager; the op's torch reference inside);
  * stock     stock torch.onnx.export (dynamo) of the same layer written in plain PyTorch
              (tests/plain_dcmha.py RankEinsumStyle, the same math and sizes) in ORT.
Each (implementation, T) runs in its own subprocess: median wall time of the timed runs after
one warm-up, and the peak extra RSS of those runs (VmHWM reset after setup, minus the RSS then).
GFLOP/s counts the layer's dense matmul work (projections, dynamic-weight nets, and QK^T and PV
over the causal-visible pairs only); the fp32 MatMul rate is torch/numpy 2048^3 on the same threads.

    python benchmarks/cpu_kernels.py                 # prints the table, updates benchmarks/RESULTS.md
    python benchmarks/cpu_kernels.py --lengths 1024 --no-write
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

D, N, R = 512, 8, 2
IMPLS = ("ours", "body", "eager", "stock")
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## CPU kernels"


def build_layer():
    import torch

    from attn2onnx.variants import build_attention

    torch.manual_seed(0)
    return build_attention("dcmha", d_model=D, n_heads=N, rank=R, causal=True, max_len=8192).eval()


def build_plain_layer():
    """The same layer in plain PyTorch (no attn2onnx ops): what a user exports with the stock exporter."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from plain_dcmha import RankEinsumStyle

    return RankEinsumStyle(d_model=D, n_heads=N, rank=R, causal=True, seed=0).eval()


def layer_flops(t: int) -> float:
    """Dense matmul FLOPs of one layer at batch 1: projections, dynamic-weight nets, QK^T + PV
    over the T(T+1)/2 causal-visible pairs."""
    k = 4 * N
    projections = 4 * 2 * t * D * D
    dynamic = 2 * t * D * 4 * k + 2 * t * 4 * k * 2 * R * N + 2 * t * D * 4 * N
    attention = 2 * 2 * D * t * (t + 1) / 2
    return projections + dynamic + attention


def export_models(folder: Path) -> dict[str, Path]:
    import onnx
    import torch

    from attn2onnx.export import to_onnx
    from attn2onnx.io_spec import InputSpec

    x = torch.randn(1, 64, D)
    specs = [InputSpec("x", (1, "seq", D), "float")]  # batch 1: the benchmark shape
    paths = {}
    for name, model, custom in (("custom", build_layer(), True), ("stock", build_plain_layer(), False)):
        proto = to_onnx(model, [x], specs, custom=custom, max_seq=8192)
        paths[name] = folder / f"dcmha_{name}.onnx"
        onnx.save(proto, paths[name])
    return paths


# ---------------------------------------------------------------- worker (one subprocess each)
def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def worker(impl: str, t: int, threads: int, repeats: int, models: dict[str, str]) -> dict:
    import numpy as np

    x = np.random.default_rng(0).standard_normal((1, t, D)).astype(np.float32)
    if impl == "eager":
        import torch

        torch.set_num_threads(threads)
        model = build_layer()
        xt = torch.from_numpy(x)

        def call():
            with torch.inference_mode():
                model(xt)
    else:
        from attn2onnx.runtime import session

        path = models["stock" if impl == "stock" else "custom"]
        sess = session(path, native=impl == "ours", threads=threads)
        name = sess.get_inputs()[0].name
        if impl == "ours":
            ops = {n.op_type for n in __import__("onnx").load(path, load_external_data=False).graph.node}
            assert "DcmhaAttention" in ops, ops

        def call():
            sess.run(None, {name: x})

    with open("/proc/self/clear_refs", "w") as fh:  # reset VmHWM to the current RSS
        fh.write("5")
    base = _rss_kib("VmRSS")
    call()  # warm-up (allocations, arena growth) counts towards the peak
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    peak = _rss_kib("VmHWM")
    return {"median_s": statistics.median(times), "times": times, "peak_extra_mib": (peak - base) / 1024}


def matmul_rate(threads: int) -> dict:
    code = f"""
import json, time, statistics, numpy as np, torch
torch.set_num_threads({threads})
n = 2048
a = np.random.rand(n, n).astype(np.float32); b = torch.rand(n, n)
out = {{}}
for name, f in (("torch", lambda: b @ b), ("numpy", lambda: a @ a)):
    f(); ts = []
    for _ in range(7):
        s = time.perf_counter(); f(); ts.append(time.perf_counter() - s)
    out[name] = 2 * n ** 3 / statistics.median(ts) / 1e9
print(json.dumps(out))
"""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_worker(impl: str, t: int, threads: int, repeats: int, models: dict[str, Path], timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, str(t), str(threads), str(repeats), json.dumps({k: str(v) for k, v in models.items()})]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        match = re.search(r"Model name:\s*(.+)", out)
        if match:
            return match.group(1).strip()
    except FileNotFoundError:
        pass
    return platform.processor() or "unknown CPU"


def table(results: dict, lengths: list[int], rates: dict) -> str:
    best_matmul = max(rates.values())
    lines = [
        "| T | implementation | median ms | speed-up of ours | peak extra RSS MiB | GFLOP/s | % of MatMul |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for t in lengths:
        ours = results[(t, "ours")].get("median_s")
        for impl in IMPLS:
            r = results[(t, impl)]
            if "error" in r:
                lines.append(f"| {t} | {impl} | {r['error']} | | | | |")
                continue
            gflops = layer_flops(t) / r["median_s"] / 1e9
            speedup = f"{r['median_s'] / ours:.1f}x" if ours else ""
            lines.append(f"| {t} | {impl} | {r['median_s'] * 1e3:.1f} | {speedup} | {r['peak_extra_mib']:.0f} | "
                         f"{gflops:.1f} | {100 * gflops / best_matmul:.0f}% |")
    return "\n".join(lines)


def write_section(text: str) -> None:
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    block = text.rstrip() + "\n\n"
    new = pattern.sub(lambda _: block, old) if pattern.search(old) else old.rstrip() + "\n\n" + block
    RESULTS.write_text(new)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (3 at T >= 4096)")
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        impl, t, threads, repeats, models = args.worker
        print(json.dumps(worker(impl, int(t), int(threads), int(repeats), json.loads(models))))
        return 0

    from attn2onnx.runtime import native

    if "ours" in args.impls and not native.available():
        print(f"error: native kernel library unavailable: {native.unavailable_reason()}", file=sys.stderr)
        return 1
    rates = matmul_rate(args.threads)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        models = export_models(Path(tmp))
        for t in args.lengths:
            for impl in IMPLS:
                if impl not in args.impls:
                    results[(t, impl)] = {"error": "not run"}
                    continue
                repeats = args.repeats if t < 4096 else min(args.repeats, 3)
                results[(t, impl)] = r = run_worker(impl, t, args.threads, repeats, models, args.timeout)
                print(f"T={t} {impl}: {r}", file=sys.stderr, flush=True)
    load = os.getloadavg()
    cmd = "python benchmarks/cpu_kernels.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    text = "\n".join([
        SECTION,
        "",
        f"One DCMHA layer, B=1, D={D}, N={N}, d={D // N}, R={R}, causal, {args.threads} threads, fp32. "
        "ours = exported model with the native kernel library in ORT; body = same model, function body "
        "(no library); eager = PyTorch module; stock = stock torch.onnx.export in ORT. Median wall time; "
        "peak extra RSS of the runs (subprocess per row); GFLOP/s of the layer's dense matmul work.",
        "",
        f"- command: `{cmd.strip()}`",
        f"- machine: {cpu_model()}, {os.cpu_count()} CPUs; load average at the end {load[0]:.1f}",
        f"- fp32 MatMul 2048^3 on {args.threads} threads: torch {rates['torch']:.0f} GFLOP/s, numpy {rates['numpy']:.0f} GFLOP/s",
        "",
        table(results, args.lengths, rates),
    ])
    print(text)
    if not args.no_write:
        write_section(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
