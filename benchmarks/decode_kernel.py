"""DcmhaAttention CPU kernel before vs after issue 12: decode steps, prefill, per-thread scratch.

One DcmhaAttention node (causal, N=8, d=64, R=2, static mix, all keys real) in ORT on 2 threads,
run by the kernel library of this checkout ("new") and by the same library with the kernel of an
older revision ("old", built from `git show REV:custom_ops/dcmha_attention/kernel.cc` into a
temporary folder):
  * decode: T=1 query against S = 512, 2048, 8192 cached keys, B = 1 and 8 (causal aligned to
    the end, the layer's attention core at one decode step; its projections are unchanged);
  * prefill: T = S = 1024 and 4096, B = 1 (no loss where the full query block fits).
The machine may be shared: each repetition runs old then new in fresh subprocesses, one warm-up
and `--runs` timed calls per shape, median per repetition; the table gives the median over the
repetitions and the old / new ratio.
Scratch: per-thread bytes of the blocked path at S=32768, N=32 from the kernel's plan
(attn2onnx_dcmha_plan) and the formula of the old kernel, plus the peak extra RSS of one call
(T=64 rows, so the blocked path, against S=32768 keys, N=32, d=16, 1 thread) with each library.

    python benchmarks/decode_kernel.py --old-rev ab1413c           # prints, updates RESULTS.md
    python benchmarks/decode_kernel.py --old-rev ab1413c --repeats 1 --no-write
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import RESULTS, cpu_model, replace_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## DCMHA kernel: decode and long contexts"
N, D_HEAD, R = 8, 64, 2
DECODE = [(b, 1, s) for s in (512, 2048, 8192) for b in (1, 8)]
PREFILL = [(1, 1024, 1024), (1, 4096, 4096)]
NOTES = (
    "Reading: decode no longer packs K and V (the old kernel repacked the whole cache every step, which\n"
    "cost more than the attention) and splits the keys over the threads; prefill at S <= 4096 runs the\n"
    "same blocked code with the same 24-row block, so its old / new spread is the shared machine's noise.\n"
    "The tiled panel (S=32768 at N=32) runs steps 1-3 twice; its time was not measured here."
)
RSS_SHAPE = {"b": 1, "t": 64, "s": 32768, "n": 32, "d": 16}


def build_old(rev: str, folder: Path) -> Path:
    """The kernel library with custom_ops/dcmha_attention/kernel.cc of ``rev`` (the shared
    native sources of this checkout), compiled like attn2onnx.runtime.native does."""
    from attn2onnx.runtime import native

    kernel = folder / "kernel.cc"
    kernel.write_text(
        subprocess.run(
            ["git", "show", f"{rev}:custom_ops/dcmha_attention/kernel.cc"],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
        ).stdout
    )
    lib = folder / native.LIBRARY_NAME
    native_dir = native.custom_ops_dir() / "native"
    cmd = [
        *native.compiler(),
        *native.CXXFLAGS,
        "-I",
        str(native.ort_include_dir()),
        "-I",
        str(native_dir),
        *map(str, sorted(native_dir.glob("*.cc"))),
        str(kernel),
        "-o",
        str(lib),
    ]
    subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL)
    return lib


# ---------------------------------------------------------------- worker (one subprocess each)
def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))


def worker(runs: int) -> dict:
    """Median ms of each decode and prefill shape with the library in ATTN2ONNX_NATIVE_LIB."""
    import numpy as np

    sys.path.insert(0, str(ROOT / "tests"))
    from test_native_kernels import dcmha_model, make_inputs

    from attn2onnx.runtime import session

    sess = session(dcmha_model(causal=1, use_static_mix=1), threads=2)
    rng = np.random.default_rng(0)
    times = {}
    for b, t, s in DECODE + PREFILL:
        feeds = make_inputs(rng, b, t, s, N, D_HEAD, R)
        sess.run(None, feeds)
        samples = []
        for _ in range(runs if t < 4096 else 1):
            start = time.perf_counter()
            sess.run(None, feeds)
            samples.append(time.perf_counter() - start)
        times[f"{b},{t},{s}"] = 1e3 * statistics.median(samples)
    return times


def rss_worker() -> dict:
    """Peak extra RSS (MiB) of one blocked-path call at S=32768, N=32 on one thread."""
    import numpy as np

    sys.path.insert(0, str(ROOT / "tests"))
    from test_native_kernels import dcmha_model, make_inputs

    from attn2onnx.runtime import session

    sess = session(dcmha_model(causal=1), threads=1)
    shape = RSS_SHAPE
    feeds = make_inputs(np.random.default_rng(0), shape["b"], shape["t"], shape["s"], shape["n"], shape["d"], R)
    with open("/proc/self/clear_refs", "w") as fh:  # reset VmHWM to the current RSS
        fh.write("5")
    before = _rss_kib("VmRSS")
    sess.run(None, feeds)
    return {"peak_extra_mib": (_rss_kib("VmHWM") - before) / 1024}


def run_worker(lib: Path, mode: str, runs: int) -> dict:
    env = dict(os.environ, ATTN2ONNX_NATIVE_LIB=str(lib))
    cmd = [sys.executable, __file__, "--worker", mode, "--runs", str(runs)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True, stdin=subprocess.DEVNULL)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- scratch
def scratch_lines(rss: dict) -> list[str]:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_native_kernels import plan

    s, n = 32768, 32
    new = plan(4096, s, n)
    widest = plan(4096, s, n, budget=1 << 40)  # the old kernel's panel: kTq rows over every key
    shape = RSS_SHAPE
    return [
        f"- per-thread scratch, blocked path, S={s}, N={n}: old {widest['bytes'] / 2**20:.1f} MiB "
        f"({widest['rows']} rows, full panel); new {new['bytes'] / 2**20:.1f} MiB ({new['rows']} rows, "
        f"{'tiled' if new['tiled'] else 'full'} panel; budget 16 MiB); decode (T=1): "
        f"{plan(1, s, n)['bytes'] / 2**10:.0f} KiB per thread",
        f"- peak extra RSS of one call, T={shape['t']}, S={shape['s']}, N={shape['n']}, d={shape['d']}, 1 thread "
        f"(inputs excluded; packed K/V copies included in both): old {rss['old']:.0f} MiB, new {rss['new']:.0f} MiB",
    ]


# ---------------------------------------------------------------- main
def table(reps: dict) -> list[str]:
    lines = ["| case | B | T | S | old ms | new ms | old / new |", "|---|---:|---:|---:|---:|---:|---:|"]
    for b, t, s in DECODE + PREFILL:
        key = f"{b},{t},{s}"
        old = statistics.median(r[key] for r in reps["old"])
        new = statistics.median(r[key] for r in reps["new"])
        kind = "decode" if t == 1 else "prefill"
        lines.append(f"| {kind} | {b} | {t} | {s} | {old:.2f} | {new:.2f} | {old / new:.2f}x |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old-rev", default="HEAD", help="git revision of the 'old' kernel.cc")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved old/new repetitions")
    parser.add_argument("--runs", type=int, default=7, help="timed calls per shape and repetition")
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    parser.add_argument("--worker", choices=["time", "rss"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.runs) if args.worker == "time" else rss_worker()))
        return 0

    from attn2onnx.runtime import native

    with tempfile.TemporaryDirectory() as tmp:
        libs = {"old": build_old(args.old_rev, Path(tmp)), "new": native.build()}
        reps: dict[str, list] = {"old": [], "new": []}
        for _ in range(args.repeats):
            for name, lib in libs.items():
                reps[name].append(run_worker(lib, "time", args.runs))
        rss = {name: run_worker(lib, "rss", 1)["peak_extra_mib"] for name, lib in libs.items()}
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()[:10]
    text = "\n".join(
        [
            SECTION,
            "",
            f"One DcmhaAttention node (causal, N={N}, d={D_HEAD}, R={R}, static mix, all keys real), ORT, 2 threads, "
            f"fp32: old = kernel.cc of {args.old_rev}, new = this checkout. Decode = T=1 against S cached keys "
            "(the layer's attention core at one step). Median over interleaved repetitions of per-run medians "
            "(prefill T=4096: one timed call per repetition); the machine is shared, so read the ratios.",
            "",
            f"- command: `python benchmarks/decode_kernel.py --old-rev {args.old_rev} --repeats {args.repeats} "
            f"--runs {args.runs}`",
            f"- date: {time.strftime('%Y-%m-%d')}; machine: {cpu_model()}, {os.cpu_count()} CPUs; "
            f"load average at the end {os.getloadavg()[0]:.1f}",
            *scratch_lines(rss),
            "",
            *table(reps),
            "",
            NOTES,
            "",
            "`lscpu | head`:",
            "",
            "```",
            *lscpu,
            "```",
        ]
    )
    print(text)
    if not args.no_write:
        replace_section(SECTION, text)
        print(f"updated {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
