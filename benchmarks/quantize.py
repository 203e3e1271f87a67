"""Weight-only quantization benchmark (issue 21 item 2): an mha and a dcmha LM (D=512, N=8, 4
layers, random weights), their decode graphs (`attn2onnx export --decode` + `optimize --target
ort`) as fp32 and after `attn2onnx quantize --weights int8` / `int4` (block 32).

Per graph: bytes on disk, the time of one decode step at batch 1 after 512 cached positions (2
threads, attn2onnx.generate.DecodeSession as `attn2onnx generate` runs it), and the relative RMS
error of that step's logits against the fp32 graph's. Each graph prefills the same 512 random ids
into its own caches; every step is timed from them (the step's output is not fed back), the graphs interleaved
round by round, order reversed every other round, median per graph; ratios are against fp32 in
the same round. The ``int8 (dynamic)`` row is ORT's quantize_dynamic (MatMulInteger) on the same
graph, the alternative the int8 mode was chosen over (attn2onnx/quantize.py).

    python benchmarks/quantize.py                 # prints, writes RESULTS.md "Quantize"
    python benchmarks/quantize.py --rounds 5 --no-write
"""

from __future__ import annotations

import argparse
import logging
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import cpu_model, replace_section  # noqa: E402

SECTION = "## Quantize"
D_MODEL, HEADS, LAYERS, THREADS, CONTEXT, VOCAB = 512, 8, 4, 2, 512, 256
READING = (
    "Reading: int8 is MatMulNBits (8 bits, block 32, accuracy level 4) rather than ORT's quantize_dynamic:\n"
    "as fast within the noise and about half its error (weights and activations scaled per block of 32, not\n"
    "per tensor). Weights shrink 3.2x (int8) and 5x (int4). On this loaded 2-core machine the step gains only\n"
    "1.1-1.4x: the contention hides the weight-reading time a quantized graph saves; an unloaded run (as in\n"
    "the Decode section) is the place to read speed-ups from."
)


def graphs(variant: str, folder: Path) -> dict[str, Path]:
    """The optimised fp32 decode graph of a random ``variant`` LM and its quantized copies."""
    import attn2onnx
    from attn2onnx.models.decode import export_decode
    from attn2onnx.quantize import quant_mode, quantize_file

    config = attn2onnx.ModelConfig(
        family="lm",
        variant=variant,
        layers=LAYERS,
        d_model=D_MODEL,
        heads=HEADS,
        max_len=2 * CONTEXT,
        vocab_size=VOCAB,
    )
    model = attn2onnx.build_model(config).eval()
    exported, paths = folder / f"{variant}.onnx", {"fp32": folder / f"{variant}.opt.onnx"}
    export_decode(model, exported)
    attn2onnx.optimize(exported, paths["fp32"], target="ort")
    for weights in ("int8", "int4"):
        paths[weights] = folder / f"{variant}.{weights}.onnx"
        quantize_file(paths["fp32"], paths[weights], quant_mode(weights))
    paths["int8 (dynamic)"] = folder / f"{variant}.dynamic.onnx"
    root = logging.getLogger()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root.setLevel(logging.ERROR)  # its advice to pre-process is for static quantization
    quantize_dynamic(paths["fp32"], paths["int8 (dynamic)"], weight_type=QuantType.QInt8)
    return paths


def measure(paths: dict[str, Path], rounds: int, steps: int) -> dict[str, dict[str, float]]:
    """Per graph: MiB on disk, median step ms, median ratio of fp32's step to its own, and the
    relative RMS error of its logits against fp32's."""
    import onnxruntime as ort

    from attn2onnx.generate import DecodeSession

    sessions = {name: DecodeSession(str(path), threads=THREADS) for name, path in paths.items()}
    rng = np.random.default_rng(0)
    prompt, ids = rng.integers(0, VOCAB, (1, CONTEXT)), rng.integers(0, VOCAB, (1, 1))
    pasts = {}
    for name, session in sessions.items():  # each graph's own caches of the same prompt
        session.prefill(prompt)
        pasts[name] = [ort.OrtValue.ortvalue_from_numpy(p.numpy().copy()) for p in session.past]

    def step(name: str) -> np.ndarray:
        sessions[name].length = CONTEXT
        return sessions[name].step(ids, past=pasts[name])

    logits = {name: step(name) for name in sessions}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    order = list(sessions)
    for round_ in range(rounds):
        for name in order if round_ % 2 == 0 else order[::-1]:
            samples = []
            for _ in range(steps):
                start = time.perf_counter()
                step(name)
                samples.append(time.perf_counter() - start)
            times[name].append(1e3 * statistics.median(samples))
    want = logits["fp32"].astype(np.float64)
    return {
        name: {
            "mib": sum(p.stat().st_size for p in paths[name].parent.glob(paths[name].name + "*")) / 2**20,
            "ms": statistics.median(times[name]),
            "speedup": statistics.median(f / t for f, t in zip(times["fp32"], times[name])),
            "rel_rms": float(np.sqrt(np.mean((logits[name] - want) ** 2) / np.mean(want**2))),
        }
        for name in sessions
    }


def table(results: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    lines = [
        "| model | graph | size (MiB) | step (ms) | fp32 / this step | logits rel. RMS error vs fp32 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for variant, rows in results.items():
        for name, row in rows.items():
            lines.append(
                f"| {variant} | {name} | {row['mib']:.1f} | {row['ms']:.2f} | {row['speedup']:.2f}x | "
                f"{row['rel_rms']:.3f} |"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="mha,dcmha")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=5, help="steps timed per graph per round")
    parser.add_argument("--note", default="", help="a line on the machine's load, for RESULTS.md")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants.split(","):
            results[variant] = measure(graphs(variant, Path(tmp)), args.rounds, args.steps)
    lines = table(results)
    print("\n".join(lines))
    if not args.no_write:
        command = shlex.join(["python", "benchmarks/quantize.py", *(argv or [])])
        text = [
            SECTION,
            "",
            f"`{command}` on {cpu_model()}, {THREADS} threads; decode step at batch 1 after {CONTEXT} cached",
            f"positions, D={D_MODEL}, {HEADS} heads, {LAYERS} layers, vocabulary {VOCAB}, random weights; graphs",
            f"interleaved over {args.rounds} rounds (median of {args.steps} steps each). {args.note}".rstrip(),
            "",
            *lines,
            "",
            READING,
        ]
        replace_section(SECTION, "\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
