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
    python benchmarks/cpu_kernels.py --candidates    # the other ops: is a native kernel worth it?

--candidates times the other ai.attn2onnx ops' function bodies in ORT (one node, B=1, N=8,
d=64, 2 threads) against the floor a fused kernel could reach without new math: the same
q, k, v through plain MatMul-Softmax-MatMul attention and through ORT's fused com.microsoft
MultiHeadAttention (the target of the lowering passes).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import RESULTS, cpu_model  # noqa: E402

D, N, R = 512, 8, 2
IMPLS = ("ours", "body", "eager", "stock")
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

    from attn2onnx.exporter import to_onnx
    from attn2onnx.io_spec import InputSpec

    x = torch.randn(1, 64, D)
    specs = [InputSpec("x", (1, "seq", D), "float")]  # batch 1: the benchmark shape
    paths = {}
    for name, model, custom in (("custom", build_layer(), True), ("stock", build_plain_layer(), False)):
        proto = to_onnx(model, [x], specs, custom=custom, max_seq=8192)
        paths[name] = folder / f"dcmha_{name}.onnx"
        onnx.save(proto, paths[name])
    return paths


# ---------------------------------------------------------------- candidate ops
CANDIDATES = ("ProbAttention", "LandmarkAttention", "PooledNormAttention", "plain attention", "MultiHeadAttention")


def candidate_model(op: str):
    """One node with dynamic T: an ai.attn2onnx op (function body attached) or a baseline."""
    from onnx import TensorProto, helper

    import attn2onnx.custom_ops as ops

    act = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, "T", N, D // N])  # noqa: E731
    mask = helper.make_tensor_value_info("key_padding_mask", TensorProto.BOOL, [1, "T"])
    out = helper.make_tensor_value_info("o", TensorProto.FLOAT, None)
    inputs, nodes, outputs, extra = [act("q"), act("k"), act("v"), mask], [], [out], []
    names = ["q", "k", "v", "key_padding_mask"]
    if op == "ProbAttention":
        outputs.append(helper.make_tensor_value_info("probs", TensorProto.FLOAT, None))
        nodes.append(helper.make_node(op, names, ["o", "probs"], domain=ops.DOMAIN, scale=0.0, causal=0))
    elif op == "LandmarkAttention":
        for stage in ("pre", "post"):
            for side in ("q", "k"):
                extra += [
                    helper.make_tensor_value_info(f"{stage}_mix_{side}", TensorProto.FLOAT, [N, N]),
                    helper.make_tensor_value_info(f"{stage}_bias_{side}", TensorProto.FLOAT, [N]),
                ]
        nodes.append(
            helper.make_node(
                op, names + [e.name for e in extra], ["o"], domain=ops.DOMAIN, landmarks=64, grid=0, scale=0.0
            )
        )
    elif op == "PooledNormAttention":
        nodes.append(
            helper.make_node(
                op,
                names,
                ["o"],
                domain=ops.DOMAIN,
                factors=[1] * (N // 2) + [2] * (N - N // 2),
                normalize=1,
                eps=1e-5,
                beta=1.0,
                rescale=1,
                scale=0.0,
            )
        )
    elif op == "plain attention":  # MatMul - Softmax - MatMul, heads transposed, no mask
        nodes += [
            helper.make_node("Transpose", ["q"], ["qh"], perm=[0, 2, 1, 3]),
            helper.make_node("Transpose", ["k"], ["kh"], perm=[0, 2, 3, 1]),
            helper.make_node("Transpose", ["v"], ["vh"], perm=[0, 2, 1, 3]),
            helper.make_node("MatMul", ["qh", "kh"], ["l0"]),
            helper.make_node("Mul", ["l0", "scale"], ["l"]),
            helper.make_node("Softmax", ["l"], ["p"], axis=-1),
            helper.make_node("MatMul", ["p", "vh"], ["oh"]),
            helper.make_node("Transpose", ["oh"], ["o"], perm=[0, 2, 1, 3]),
        ]
        inputs = inputs[:3]
    elif op == "MultiHeadAttention":
        shape = helper.make_node(
            "Constant", [], ["shape"], value=helper.make_tensor("s", TensorProto.INT64, [3], [1, -1, D])
        )
        nodes += [shape] + [helper.make_node("Reshape", [x, "shape"], [x + "2"]) for x in "qkv"]
        nodes.append(helper.make_node(op, ["q2", "k2", "v2"], ["o"], domain="com.microsoft", num_heads=N))
        inputs = inputs[:3]
    graph = helper.make_graph(
        nodes,
        "candidate",
        inputs + extra,
        outputs,
        initializer=[helper.make_tensor("scale", TensorProto.FLOAT, [], [(D // N) ** -0.5])]
        if op == "plain attention"
        else [],
    )
    return helper.make_model(
        graph,
        ir_version=10,
        functions=list(ops.function_protos().values()),
        opset_imports=[
            helper.make_opsetid("", 23),
            helper.make_opsetid(ops.DOMAIN, 1),
            helper.make_opsetid("com.microsoft", 1),
        ],
    )


def candidate_feeds(model, t: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(0)
    feeds = {}
    for vi in model.graph.input:
        dims = [t if d.dim_param == "T" else d.dim_value for d in vi.type.tensor_type.shape.dim]
        if vi.type.tensor_type.elem_type == 9:
            feeds[vi.name] = np.ones(dims, bool)
        elif "mix" in vi.name:
            feeds[vi.name] = np.eye(N, dtype=np.float32)
        elif "bias" in vi.name:
            feeds[vi.name] = np.zeros(dims, np.float32)
        else:
            feeds[vi.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


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
    if impl in CANDIDATES:
        from attn2onnx.runtime import session

        model = candidate_model(impl)
        sess = session(model, native=False, threads=threads)
        feeds = candidate_feeds(model, t)

        def call():
            sess.run(None, feeds)
    elif impl == "eager":
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
    env = dict(
        os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads)
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_worker(impl: str, t: int, threads: int, repeats: int, models: dict[str, Path], timeout: float) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        impl,
        str(t),
        str(threads),
        str(repeats),
        json.dumps({k: str(v) for k, v in models.items()}),
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(result.stdout.strip().splitlines()[-1])


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
            lines.append(
                f"| {t} | {impl} | {r['median_s'] * 1e3:.1f} | {speedup} | {r['peak_extra_mib']:.0f} | "
                f"{gflops:.1f} | {100 * gflops / best_matmul:.0f}% |"
            )
    return "\n".join(lines)


SUBSECTION = "### Candidate ops for native kernels"
CORE_SUBSECTION = "### Attention core against SDPA and MultiHeadAttention (issue 25)"
SUBSECTIONS = (SUBSECTION, CORE_SUBSECTION)


def _block(text: str, header: str, stop: str) -> re.Pattern:
    return re.compile(rf"^{re.escape(header)}\n.*?(?={stop}|\Z)", re.S | re.M)


def write_section(text: str, sub: str | None = None) -> None:
    """Put ``text`` into RESULTS.md's CPU-kernels section (other sections untouched): the main
    table (``sub`` None) replaces the section's text before its ``###`` subsections and keeps them;
    a subsection (``sub``, one of SUBSECTIONS) replaces only itself, or is appended."""
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    section_re = _block(old, SECTION, "^## ")
    match = section_re.search(old)
    section = match.group(0) if match else SECTION + "\n"
    parts = {h: m.group(0).rstrip() for h in SUBSECTIONS if (m := _block(section, h, "^##").search(section))}
    main_part = section
    for h in parts:
        main_part = _block(main_part, h, "^##").sub("", main_part)
    if sub is None:
        main_part = text
    else:
        parts[sub] = text.rstrip()
    section = main_part.rstrip() + "\n\n" + "".join(parts[h] + "\n\n" for h in SUBSECTIONS if h in parts)
    new = section_re.sub(lambda _: section, old) if match else old.rstrip() + "\n\n" + section
    RESULTS.write_text(new)


CANDIDATE_DECISIONS = """
Decisions drawn from these figures (2026-11, ORT 1.32):
- LandmarkAttention: no kernel. The body is already linear in T (0.26x plain attention and 49 MiB
  at T=4096) and is a handful of small MatMuls; a fused kernel has little left to save.
- PooledNormAttention: no kernel; lower it instead. The body costs 3.5x plain attention and
  4.2 GiB at T=4096, but the pooling and BN statistics are O(T N d) pre-processing, after which
  each factor group is standard attention that ORT's fused MultiHeadAttention runs in 0.83x the
  plain time and 25 MiB: a pass that lowers it onto MultiHeadAttention gets the whole gain.
- ProbAttention: next candidate, lower priority. It must return the [B,N,T,S] probabilities
  (512 MiB at T=4096), so memory cannot drop below that; the body takes 2.3x plain attention and
  2.8 GiB, so a kernel writing the probabilities once could save about 2x time and 5x memory.
"""


def candidates(args, argv) -> int:
    rows = [
        "| T | graph (ORT, function body) | median ms | vs plain attention | peak extra RSS MiB |",
        "|---:|---|---:|---:|---:|",
    ]
    for t in args.lengths:
        results = {}
        for op in CANDIDATES:
            repeats = args.repeats if t < 4096 else min(args.repeats, 3)
            results[op] = r = run_worker(op, t, args.threads, repeats, {}, args.timeout)
            print(f"T={t} {op}: {r}", file=sys.stderr, flush=True)
        floor = results["plain attention"].get("median_s")
        for op, r in results.items():
            if "error" in r:
                rows.append(f"| {t} | {op} | {r['error']} | | |")
                continue
            ratio = f"{r['median_s'] / floor:.2f}x" if floor else ""
            rows.append(f"| {t} | {op} | {r['median_s'] * 1e3:.1f} | {ratio} | {r['peak_extra_mib']:.0f} |")
    cmd = "python benchmarks/cpu_kernels.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = "\n".join(
        [
            SUBSECTION,
            "",
            f"Single node, B=1, N={N}, d={D // N}, non-causal, all keys real, {args.threads} threads; "
            f"LandmarkAttention "
            "with 64 landmarks, identity mixes; PooledNormAttention BN+SH with factors 1,1,1,1,2,2,2,2. "
            "`plain attention` (MatMul-Softmax-MatMul) and `MultiHeadAttention` (com.microsoft, fused) on "
            "the same q, k, v "
            "are the floors a kernel without new math could reach.",
            "",
            f"- command: `{cmd.strip()}`",
            f"- machine: {cpu_model()}, {os.cpu_count()} CPUs; load average at the end {os.getloadavg()[0]:.1f}",
            "",
            *rows,
            CANDIDATE_DECISIONS,
        ]
    )
    print(text)
    if not args.no_write:
        write_section(text, SUBSECTION)
    return 0


# ---------------------------------------------------------------- attention core (issue 25)
CORE_SHAPES = {"D=512 N=8": (8, 64), "D=2560 N=32": (32, 80)}  # name: (heads, head dim)
CORE_IMPLS = ("ours", "plain", "ort_mha", "sdpa", "sdpa_compiled")
CHOICE_TABLE = Path(__file__).resolve().parents[1] / "passes" / "native_attention_table.json"
PAD_FRACTION = 0.25  # padded mode: the last quarter of the keys is padding


def core_model(op: str, n: int, d: int, mode: str):
    """One attention node with dynamic B, T, S: DcmhaAttention (R=2, the DCMHA core: composes
    included), StandardAttention ("plain": the same kernel core for plain attention, [B,T,N*d]
    inputs, the mask as its causal mode and a [B,S] key mask) or com.microsoft.MultiHeadAttention
    (plain attention, [B,T,N*d] inputs)."""
    from onnx import TensorProto, helper

    import attn2onnx.custom_ops as ops

    causal = int(mode == "causal")
    if op == "ours":
        dims = {"q": ["B", "T", n, d], "k": ["B", "S", n, d], "v": ["B", "S", n, d], "q_factors": ["B", "T", 2, 5, n]}
        dims |= {"k_factors": ["B", "S", 2, 5, n], "key_padding_mask": ["B", "S"], "static_mix": [2, n, n]}
        inputs = [
            helper.make_tensor_value_info(k, TensorProto.BOOL if k == "key_padding_mask" else TensorProto.FLOAT, v)
            for k, v in dims.items()
        ]
        node = helper.make_node(
            "DcmhaAttention", list(dims), ["o"], domain=ops.DOMAIN, scale=0.0, causal=causal, window=0, use_static_mix=0
        )
        domain = helper.make_opsetid(ops.DOMAIN, 1)
    elif op == "plain":
        inputs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["B", x.upper(), n * d]) for x in "qks"]
        inputs[2].name = "v"
        inputs.append(helper.make_tensor_value_info("key_padding_mask", TensorProto.BOOL, ["B", "K"]))
        node = helper.make_node(
            "StandardAttention",
            [i.name for i in inputs],
            ["o"],
            domain=ops.DOMAIN,
            num_heads=n,
            kv_num_heads=0,
            scale=0.0,
            causal=causal,
            window=0,
        )
        domain = helper.make_opsetid(ops.DOMAIN, 1)
    else:
        inputs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["B", x.upper(), n * d]) for x in "qks"]
        inputs[2].name = "v"
        names = ["q", "k", "v"]
        if mode == "padded":
            inputs.append(helper.make_tensor_value_info("key_padding_mask", TensorProto.INT32, ["B", "K"]))
            names += ["", "key_padding_mask"]
        node = helper.make_node(
            "MultiHeadAttention", names, ["o"], domain="com.microsoft", num_heads=n, unidirectional=causal
        )
        domain = helper.make_opsetid("com.microsoft", 1)
    graph = helper.make_graph([node], "core", inputs, [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)])
    return helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 23), domain])


def core_pairs(t: int, mode: str) -> float:
    """(query, key) pairs attended: T(T+1)/2 causal, T x real keys padded."""
    return t * (t + 1) / 2 if mode == "causal" else t * (t - int(PAD_FRACTION * t))


def core_calls(t: int, n: int, d: int, mode: str, threads: int, impls: tuple[str, ...]) -> dict:
    """A zero-argument call per implementation, on the same q, k, v (B=1, T=S)."""
    import numpy as np
    import torch

    from attn2onnx.runtime import session

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, t, n, d)).astype(np.float32) for _ in range(3))
    real = np.arange(t) < t - int(PAD_FRACTION * t) if mode == "padded" else np.ones(t, bool)
    calls = {}
    if "ours" in impls:
        factors = lambda length: (0.3 * rng.standard_normal((1, length, 2, 5, n))).astype(np.float32)  # noqa: E731
        feeds = {"q": q, "k": k, "v": v, "q_factors": factors(t), "k_factors": factors(t)}
        feeds |= {"key_padding_mask": real[None], "static_mix": np.zeros((2, n, n), np.float32)}
        ours = session(core_model("ours", n, d, mode), native=True, threads=threads)
        calls["ours"] = lambda: ours.run(None, feeds)
    if "plain" in impls:
        pfeeds = {"q": q.reshape(1, t, n * d), "k": k.reshape(1, t, n * d), "v": v.reshape(1, t, n * d)}
        pfeeds["key_padding_mask"] = real[None]
        plain = session(core_model("plain", n, d, mode), native=True, threads=threads)
        calls["plain"] = lambda: plain.run(None, pfeeds)
    if "ort_mha" in impls:
        mfeeds = {"q": q.reshape(1, t, n * d), "k": k.reshape(1, t, n * d), "v": v.reshape(1, t, n * d)}
        if mode == "padded":
            mfeeds["key_padding_mask"] = real[None].astype(np.int32)
        mha = session(core_model("ort_mha", n, d, mode), native=False, threads=threads)
        calls["ort_mha"] = lambda: mha.run(None, mfeeds)
    qt, kt, vt = (torch.from_numpy(x).transpose(1, 2).contiguous() for x in (q, k, v))
    mask = None if mode == "causal" else torch.from_numpy(real)[None, None, None, :]

    def sdpa(qt, kt, vt, mask):
        f = torch.nn.functional.scaled_dot_product_attention
        return f(qt, kt, vt, is_causal=True) if mask is None else f(qt, kt, vt, attn_mask=mask)

    if "sdpa" in impls:
        calls["sdpa"] = lambda: sdpa(qt, kt, vt, mask)
    if "sdpa_compiled" in impls:
        compiled = torch.compile(sdpa, dynamic=False)
        calls["sdpa_compiled"] = lambda: compiled(qt, kt, vt, mask)
    return calls


def core_measure(args) -> list[dict]:
    """Every (shape, mode, T): the implementations and ORT's 2048^3 MatMul, interleaved round by
    round in this process, median time of `repeats` rounds after a warm-up: wall time, or with
    ``--clock cpu`` (one thread) the CPU time of this process, which other processes' load on a
    shared machine disturbs far less than wall time."""
    import numpy as np
    import torch
    from onnx import TensorProto, helper

    from attn2onnx.runtime import session

    torch.set_num_threads(args.threads)
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [2048, 2048])
    mm_graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "a"], ["o"])], "mm", [a], [helper.make_tensor_value_info("o", 1, None)]
    )
    mm = session(
        helper.make_model(mm_graph, ir_version=10, opset_imports=[helper.make_opsetid("", 23)]), threads=args.threads
    )
    mm_feed = {"a": np.random.default_rng(1).standard_normal((2048, 2048)).astype(np.float32)}
    rows = []
    for shape in args.shapes:
        n, d = CORE_SHAPES[shape]
        for mode in args.modes:
            for t in args.lengths:
                calls = core_calls(t, n, d, mode, args.threads, tuple(args.core_impls))
                calls["matmul"] = lambda: mm.run(None, mm_feed)
                for call in calls.values():
                    call()
                times = {name: [] for name in calls}
                clock = time.process_time if args.clock == "cpu" else time.perf_counter
                for _ in range(args.repeats if t <= 2048 else min(args.repeats, 3)):
                    for name, call in calls.items():
                        start = clock()
                        call()
                        times[name].append(clock() - start)
                row = {"shape": shape, "mode": mode, "T": t, "n": n, "d": d, "load": os.getloadavg()[0]}
                row |= {name: statistics.median(ts) for name, ts in times.items()}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def core_table(rows: list[dict], impls: tuple[str, ...]) -> str:
    lines = [
        "| shape | mask | T | " + " | ".join(f"{i} ms" for i in impls) + " | ours / sdpa | ours / ort_mha | "
        "plain / ort_mha | plain / sdpa_compiled | ours GFLOP/s (% MatMul) | plain GFLOP/s (% MatMul) | "
        "sdpa GFLOP/s (% MatMul) | MatMul GFLOP/s | load |",
        "|---|---|---:|" + "---:|" * len(impls) + "---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        flops = 4 * r["n"] * r["d"] * core_pairs(r["T"], r["mode"])
        peak = 2 * 2048**3 / r["matmul"] / 1e9
        rate = lambda name: f"{flops / r[name] / 1e9:.0f} ({100 * flops / r[name] / 1e9 / peak:.0f}%)"  # noqa: E731
        ratio = lambda a, b: f"{r[a] / r[b]:.2f}x" if a in r and b in r else ""  # noqa: E731
        lines.append(
            f"| {r['shape']} | {r['mode']} | {r['T']} | "
            + " | ".join(f"{r[i] * 1e3:.1f}" if i in r else "" for i in impls)
            + f" | {ratio('ours', 'sdpa')} | {ratio('ours', 'ort_mha')} | {ratio('plain', 'ort_mha')} | "
            f"{ratio('plain', 'sdpa_compiled')} | {rate('ours') if 'ours' in r else ''} | "
            f"{rate('plain') if 'plain' in r else ''} | {rate('sdpa') if 'sdpa' in r else ''} | {peak:.0f} | "
            f"{r['load']:.1f} |"
        )
    return "\n".join(lines)


def core_plot(rows: list[dict], impls: tuple[str, ...], path: Path) -> bool:
    """Per shape and mask: median ms against T (log-log, top) and each time over SDPA's (bottom);
    False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullFormatter
    except ImportError:
        return False
    panels = sorted({(r["shape"], r["mode"]) for r in rows})
    fig, axes = plt.subplots(2, len(panels), figsize=(4.5 * len(panels), 7), squeeze=False, sharex="col")
    for col, (shape, mode) in enumerate(panels):
        sel = [r for r in rows if (r["shape"], r["mode"]) == (shape, mode)]
        ts = [r["T"] for r in sel]
        top, bottom = axes[0][col], axes[1][col]
        for impl in impls:
            if all(impl in r for r in sel):
                top.plot(ts, [r[impl] * 1e3 for r in sel], marker="o", label=impl)
                bottom.plot(ts, [r[impl] / r["sdpa"] for r in sel], marker="o", label=impl)
        bottom.axhline(1.1, color="grey", linestyle="--", linewidth=1, label="1.1x (goal)")
        top.set(xscale="log", yscale="log", ylabel="median ms", title=f"{shape}, {mode}")
        bottom.set(xscale="log", xlabel="T (= S)", ylabel="time / sdpa")
        for ax in (top, bottom):
            ax.set_xticks(ts, [str(t) for t in ts])
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.grid(True, which="major", alpha=0.3)
        top.legend(fontsize=8)
        bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def core_goals(rows: list[dict]) -> list[str]:
    """Issue 25's goals, each as a line saying whether these rows meet it (and where not)."""

    def low(impl: str) -> list[dict]:
        share = lambda r: 4 * r["n"] * r["d"] * core_pairs(r["T"], r["mode"]) / r[impl] * r["matmul"] / (2 * 2048**3)  # noqa: E731
        return [r for r in rows if impl in r and r["T"] >= 1024 and share(r) < 0.7]

    where = lambda sel: ", ".join(f"{r['shape']} {r['mode']} T={r['T']}" for r in sel)  # noqa: E731
    judged = lambda sel, ok: "met." if ok and not sel else (f"not met at {where(sel)}." if sel else "not measured.")  # noqa: E731
    has = lambda *impls: [r for r in rows if all(i in r for i in impls)]  # noqa: E731
    long_rows = lambda impl: [r for r in has(impl) if r["T"] >= 1024]  # noqa: E731
    return [
        "Goals (issue 25), judged on this table:",
        "- DCMHA core within 1.1x of SDPA's plain attention at every T: "
        + judged([r for r in has("ours", "sdpa") if r["ours"] > 1.1 * r["sdpa"]], has("ours", "sdpa")),
        "- DCMHA core >= 70% of the MatMul rate at T >= 1024: " + judged(low("ours"), long_rows("ours")),
        "- plain attention core (StandardAttention) >= 70% of the MatMul rate at T >= 1024: "
        + judged(low("plain"), long_rows("plain")),
        "- plain attention through the ort target (StandardAttention, what the lowering emits where the "
        "choice table says so) at least as fast as compiled SDPA: "
        + judged(
            [r for r in has("plain", "sdpa_compiled") if r["plain"] > r["sdpa_compiled"]], has("plain", "sdpa_compiled")
        ),
    ]


def choice_table(rows: list[dict], command: str) -> dict:
    """The lowering's table (passes/native_attention.py): per mask mode and head dim, StandardAttention's
    time over MultiHeadAttention's at each measured T."""
    classes: dict[str, dict] = {}
    for r in sorted(rows, key=lambda r: r["T"]):
        if "plain" in r and "ort_mha" in r:
            entry = classes.setdefault(f"{r['mode']}/d{r['d']}", {"T": [], "ratio": []})
            entry["T"].append(r["T"])
            entry["ratio"].append(round(r["plain"] / r["ort_mha"], 3))
    return {"command": command, "machine": cpu_model(), "classes": classes}


def core(args, argv) -> int:
    from attn2onnx.runtime import native

    if "ours" in args.core_impls and not native.available():
        print(f"error: native kernel library unavailable: {native.unavailable_reason()}", file=sys.stderr)
        return 1
    impls = tuple(i for i in CORE_IMPLS if i in args.core_impls)
    data = Path(__file__).with_name("cpu_attention_core.json")
    cmd = "python benchmarks/cpu_kernels.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        cmd, rows = saved["command"], saved["rows"]
    else:
        rows = core_measure(args)
        if not args.no_write:
            data.write_text(json.dumps({"command": cmd.strip(), "rows": rows}, indent=1) + "\n")
    table = choice_table(rows, cmd.strip())
    if not args.no_write and table["classes"]:
        CHOICE_TABLE.write_text(json.dumps(table, indent=1) + "\n")
    plot = Path(__file__).with_name("cpu_attention_core.png")
    plotted = not args.no_write and core_plot(rows, impls, plot)
    text = "\n".join(
        [
            CORE_SUBSECTION,
            "",
            f"One attention node, B=1, T=S, {args.threads} thread(s), fp32, in one process: for each row the "
            "implementations and ORT's 2048^3 MatMul run interleaved, round by round, and the table gives "
            + ("median wall times. " if args.clock == "wall" else "median CPU times of the process (--clock cpu). ")
            + "ours = DcmhaAttention (native kernel, R=2: both composes included, "
            "so it does more work than the others); plain = StandardAttention (the same kernel core for plain "
            "attention, single-pass flash form, the mask as its causal mode and a [B,S] key mask: what "
            "`optimize --target ort` emits by default where it beats MultiHeadAttention); "
            "ort_mha = com.microsoft.MultiHeadAttention; sdpa / "
            "sdpa_compiled = torch's scaled_dot_product_attention, eager / torch.compile, on contiguous "
            "[B,N,T,d]. causal: every key real; padded: non-causal, the last quarter of the keys padding. "
            "GFLOP/s: 4 N d x the attended (query, key) pairs, against the MatMul of the same row. "
            "The machine is shared with other sessions (load average per row): read the ratios.",
            "",
            f"- command: `{cmd.strip()}`",
            f"- machine: {cpu_model()}, {os.cpu_count()} CPUs",
            *(
                [f"- plot: `benchmarks/{plot.name}` (median ms against T); rows: `benchmarks/{data.name}`"]
                if plotted
                else []
            ),
            *(
                [f"- the lowering's choice table (plain / ort_mha per mask and head dim): `passes/{CHOICE_TABLE.name}`"]
                if table["classes"]
                else []
            ),
            "",
            core_table(rows, impls),
            "",
            *core_goals(rows),
        ]
    )
    print(text)
    if not args.no_write:
        write_section(text, CORE_SUBSECTION)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (3 at T >= 4096)")
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    parser.add_argument("--candidates", action="store_true", help="profile the other ops' function bodies instead")
    parser.add_argument("--core", action="store_true", help="the attention core against SDPA and ORT MHA instead")
    parser.add_argument("--shapes", nargs="+", default=list(CORE_SHAPES), choices=list(CORE_SHAPES))
    parser.add_argument("--modes", nargs="+", default=["causal", "padded"], choices=["causal", "padded"])
    parser.add_argument("--core-impls", nargs="+", default=list(CORE_IMPLS), choices=CORE_IMPLS)
    parser.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall", help="--core: cpu = process CPU time (1 thread)"
    )
    parser.add_argument("--from-json", help="--core: render the table and plot from rows saved before, measure nothing")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        impl, t, threads, repeats, models = args.worker
        print(json.dumps(worker(impl, int(t), int(threads), int(repeats), json.loads(models))))
        return 0

    if args.candidates:
        return candidates(args, argv)
    if args.core:
        if args.clock == "cpu" and args.threads != 1:
            parser.error("--clock cpu measures one thread: give --threads 1")
        return core(args, argv)
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
    text = "\n".join(
        [
            SECTION,
            "",
            f"One DCMHA layer, B=1, D={D}, N={N}, d={D // N}, R={R}, causal, {args.threads} threads, fp32. "
            "ours = exported model with the native kernel library in ORT; body = same model, function body "
            "(no library); eager = PyTorch module; stock = stock torch.onnx.export in ORT. Median wall time; "
            "peak extra RSS of the runs (subprocess per row); GFLOP/s of the layer's dense matmul work. "
            "The machine may be shared with other work (load average below): compare rows of one table.",
            "",
            f"- command: `{cmd.strip()}`",
            f"- machine: {cpu_model()}, {os.cpu_count()} CPUs; load average at the end {load[0]:.1f}",
            f"- fp32 MatMul 2048^3 on {args.threads} threads: torch {rates['torch']:.0f} GFLOP/s, numpy "
            f"{rates['numpy']:.0f} GFLOP/s",
            "",
            table(results, args.lengths, rates),
        ]
    )
    print(text)
    if not args.no_write:
        write_section(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
