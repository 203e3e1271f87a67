"""GPU: the fused DCMHA Triton kernel against the alternatives, on one CUDA device.

First correctness: the fused kernel (fp32 / fp16 / bf16, padding, causal, window, static mix)
against the op's reference computed in float64 on the same inputs. Then, for N = 32 heads with
d = 80 (DCFormer-2.8B) and d = 128 (DCPythia-6.9B), bf16, causal, B = 1..8, T = S = 1024..8192:

  * fused     custom_ops/dcmha_attention/triton_kernel.py (never materialises [B,N,T,S])
  * eager     the op's PyTorch reference (dcmha_attention_reference), eager
  * compiled  torch.compile of that reference (dynamic shapes, one compile per head dim)
  * sdpa      plain F.scaled_dot_product_attention, no composition (the floor DCMHA pays over)

Timings are CUDA-event medians after warm-up; memory is the peak allocated during the timed
runs beyond what was allocated before (inputs excluded). Out-of-memory is reported, not fatal.
The table is printed last.

    python benchmarks/gpu.py                              # full grid (CUDA)
    python benchmarks/gpu.py --batches 1 4 --lengths 2048 --json out.json
    python benchmarks/gpu.py --tiny --interpret           # CPU, Triton interpreter, tiny sizes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

IMPLS = ("fused", "eager", "compiled", "sdpa")


@dataclass
class Row:
    d: int
    batch: int
    length: int
    ms: dict = field(default_factory=dict)  # impl -> median ms, or None
    mb: dict = field(default_factory=dict)  # impl -> peak MiB, or None
    notes: dict = field(default_factory=dict)  # impl -> why missing (OOM, skipped, ...)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny sizes (N 4, d 8/16, T 16/32, B 1/2)")
    p.add_argument("--interpret", action="store_true", help="run Triton's interpreter on the CPU (with --tiny)")
    p.add_argument("--batches", type=int, nargs="+", default=None)
    p.add_argument("--lengths", type=int, nargs="+", default=None)
    p.add_argument("--head-dims", type=int, nargs="+", default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--window", type=int, default=0, help="local window (0 = global causal)")
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--skip-check", action="store_true", help="skip the correctness pass")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    if args.interpret:
        if not args.tiny:
            p.error("--interpret runs numpy per Triton program: use it with --tiny")
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere
    if args.tiny:
        args.batches = args.batches or [1, 2]
        args.lengths = args.lengths or [16, 32]
        args.head_dims = args.head_dims or [8, 16]
        args.heads = args.heads or 4
        args.warmup = 1 if args.warmup is None else args.warmup
        args.reps = 2 if args.reps is None else args.reps
        if args.interpret and "compiled" in args.impls and args.impls == list(IMPLS):
            args.impls = [i for i in IMPLS if i != "compiled"]  # inductor on the CPU: slow, beside the point
    else:
        args.batches = args.batches or [1, 2, 4, 8]
        args.lengths = args.lengths or [1024, 2048, 4096, 8192]
        args.head_dims = args.head_dims or [80, 128]
        args.heads = args.heads or 32
        args.warmup = 3 if args.warmup is None else args.warmup
        args.reps = 10 if args.reps is None else args.reps
    return args


def make_inputs(torch, B, T, S, N, d, dtype, device, R=2, seed=0, pad=False):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    q, k, v = rnd(B, T, N, d), rnd(B, S, N, d), rnd(B, S, N, d)
    qf, kf = rnd(B, T, 2, 2 * R + 1, N, scale=0.3), rnd(B, S, 2, 2 * R + 1, N, scale=0.3)
    mask = torch.ones(B, S, dtype=torch.bool)
    if pad:
        mask = torch.rand(B, S, generator=g) > 0.2
    wb = rnd(2, N, N, scale=0.1)
    return q, k, v, qf, kf, mask.to(device), wb


def correctness(torch, fused, reference, device, tiny) -> list[str]:
    """Fused kernel vs the reference in float64; returns lines, raises on a failure."""
    N, d, T, S = (4, 16, 24, 40) if tiny else (32, 80, 200, 333)
    cases = [
        dict(dtype=torch.float32, causal=True, window=0, mix=False, pad=True, tol=2e-4),
        dict(dtype=torch.float16, causal=True, window=0, mix=True, pad=True, tol=3e-2),
        dict(dtype=torch.float16, causal=True, window=7, mix=False, pad=False, tol=3e-2),
        dict(dtype=torch.float16, causal=False, window=0, mix=False, pad=True, tol=3e-2),
    ]
    if device != "cpu":  # the interpreter's bf16 dot is broken; bf16 is a GPU check
        cases.append(dict(dtype=torch.bfloat16, causal=True, window=0, mix=False, pad=True, tol=6e-2))
        cases.append(dict(dtype=torch.bfloat16, causal=True, window=64, mix=True, pad=False, tol=6e-2, d=128))
    lines = []
    for c in cases:
        dd = c.get("d", d)
        ins = make_inputs(torch, 2, T, S, N, dd, c["dtype"], device, pad=c["pad"])
        out = fused(*ins, 0.0, c["causal"], c["window"], c["mix"])
        as64 = [t.double() if t.is_floating_point() else t for t in ins]
        ref = reference(*as64, 0.0, c["causal"], c["window"], c["mix"])
        err = (out.double() - ref).abs().max().item()
        rel = err / max(ref.abs().max().item(), 1e-12)
        ok = rel < c["tol"] and bool(torch.isfinite(out).all())
        lines.append(
            f"{'PASS' if ok else 'FAIL'} {str(c['dtype']).removeprefix('torch.'):8s} d={dd:<3d} "
            f"causal={int(c['causal'])} window={c['window']:<3d} mix={int(c['mix'])} pad={int(c['pad'])} "
            f"max|err|={err:.2e} rel={rel:.2e} (tol {c['tol']:.0e})"
        )
        if not ok:
            raise SystemExit("\n".join(lines) + "\ncorrectness check failed")
    return lines


class Timer:
    def __init__(self, torch, device):
        self.torch, self.cuda = torch, device != "cpu"

    def measure(self, fn, warmup, reps):
        torch = self.torch
        for _ in range(warmup):
            fn()
        if self.cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(reps):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if self.cuda else None
        return statistics.median(times), peak


def sdpa_fn(torch, q, k, v, mask, causal):
    import torch.nn.functional as F

    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    if causal and q.shape[1] == k.shape[1] and bool(mask.all()):
        return lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
    T, S = q.shape[1], k.shape[1]
    allowed = mask[:, None, None, :]
    if causal:
        allowed = allowed & (
            torch.arange(S, device=q.device)[None, :] <= torch.arange(T, device=q.device)[:, None] + S - T
        )
    return lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=allowed)


def run(args) -> int:
    import torch

    device = "cpu" if args.interpret else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu.py: no CUDA device here; use --tiny --interpret for the CPU mode", file=sys.stderr)
        return 2
    from attn2onnx.custom_ops.dcmha_attention.reference import dcmha_attention_reference
    from attn2onnx.custom_ops.dcmha_attention.triton_kernel import dcmha_attention_triton

    header = [
        f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu (Triton interpreter)'}; "
        f"torch {torch.__version__}"
    ]
    try:
        import triton

        header[0] += f"; triton {triton.__version__}"
    except ImportError:  # pragma: no cover
        pass
    if not args.skip_check:
        print("correctness (fused vs float64 reference):", flush=True)
        for line in correctness(torch, dcmha_attention_triton, dcmha_attention_reference, device, args.tiny):
            print("  " + line, flush=True)

    timer = Timer(torch, device)
    dtype = torch.float32 if args.interpret else torch.bfloat16
    compiled = torch.compile(dcmha_attention_reference, dynamic=True) if "compiled" in args.impls else None
    rows: list[Row] = []
    causal, window = True, args.window
    for d in args.head_dims:
        for T in args.lengths:
            for B in args.batches:
                row = Row(d=d, batch=B, length=T)
                rows.append(row)
                try:
                    ins = make_inputs(torch, B, T, T, args.heads, d, dtype, device)
                except torch.OutOfMemoryError:
                    row.notes = {i: "OOM (inputs)" for i in args.impls}
                    continue
                fns = {
                    "fused": lambda: dcmha_attention_triton(*ins, 0.0, causal, window, False),
                    "eager": lambda: dcmha_attention_reference(*ins, 0.0, causal, window, False),
                    "compiled": lambda: compiled(*ins, 0.0, causal, window, False),
                    "sdpa": sdpa_fn(torch, ins[0], ins[1], ins[2], ins[5], causal) if not window else None,
                }
                for impl in args.impls:
                    fn = fns[impl]
                    if fn is None:
                        row.notes[impl] = "n/a"
                        continue
                    try:
                        row.ms[impl], row.mb[impl] = timer.measure(fn, args.warmup, args.reps)
                    except torch.OutOfMemoryError:
                        row.notes[impl] = "OOM"
                    except Exception as err:  # noqa: BLE001 - one failing impl must not stop the grid
                        row.notes[impl] = f"error: {type(err).__name__}"
                        print(f"  {impl} d={d} B={B} T={T}: {err}", file=sys.stderr, flush=True)
                    finally:
                        if device == "cuda":
                            torch.cuda.empty_cache()
                print(
                    f"  done d={d} T={T} B={B}: "
                    + ", ".join(
                        f"{i} {row.ms[i]:.3f} ms" if i in row.ms else f"{i} {row.notes.get(i)}" for i in args.impls
                    ),
                    flush=True,
                )
                ins = fns = None  # free this shape's inputs before the next one
    if args.json:
        args.json.write_text(
            json.dumps(
                {"header": header, "heads": args.heads, "window": window, "rows": [asdict(r) for r in rows]}, indent=1
            )
        )
    print_table(header, args, rows)
    return 0


def print_table(header, args, rows) -> None:
    impls = args.impls
    cols = ["d", "B", "T"] + [f"{i} ms" for i in impls] + [f"{i} MiB" for i in impls]
    if "fused" in impls and "eager" in impls:
        cols.append("eager/fused")
    table = [cols]
    for r in rows:
        cells = [str(r.d), str(r.batch), str(r.length)]
        cells += [f"{r.ms[i]:.3f}" if i in r.ms else r.notes.get(i, "-") for i in impls]
        cells += [
            f"{r.mb[i]:.0f}" if r.mb.get(i) is not None else ("-" if i in r.ms else r.notes.get(i, "-")) for i in impls
        ]
        if "eager/fused" in cols:
            cells.append(f"{r.ms['eager'] / r.ms['fused']:.2f}x" if "fused" in r.ms and "eager" in r.ms else "-")
        table.append(cells)
    widths = [max(len(row[c]) for row in table) for c in range(len(cols))]
    print()
    for line in header:
        print(line)
    print(
        f"DCMHA attention core, N={args.heads}, R=2, causal, window={args.window or 'none'}, "
        f"{'fp32' if args.interpret else 'bf16'}, warm-up {args.warmup}, median of {args.reps}"
    )
    for i, row in enumerate(table):
        print(" | ".join(cell.rjust(w) for cell, w in zip(row, widths)))
        if i == 0:
            print("-+-".join("-" * w for w in widths))


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
