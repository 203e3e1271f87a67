"""Decode in ONNX Runtime GenAI (issue 21 item 3): one decode step of the folder
``attn2onnx.genai.write_genai_folder`` writes, run by onnxruntime_genai's Generator, against the
same graph run as ``attn2onnx generate`` runs it (attn2onnx.generate.DecodeSession, IO binding).

mha and dcmha LMs of benchmarks/generate.py's size (D=512, N=8, 4 layers, vocabulary 256, fp32,
random weights), the decode graph after ``optimize --target ort`` (mha: MultiHeadAttention with
past / present; dcmha: DcmhaAttention with the native kernel library, its caches packed into
GenAI's key / value pairs). Both in one process with 2 intra-op threads each (GenAI's through
genai_config.json's session options). Per batch B and context C: both prefill C random tokens
(untimed), then ``--steps`` steps: GenAI's ``generate_next_token()`` (its greedy pick, then the step)
against ``DecodeSession.step`` plus the argmax; the engines take turns by repetition (which goes
first alternates). Median per repetition, median over repetitions (each a fresh prefill); the
machine is shared, so read the ratios.

    python benchmarks/genai.py                     # prints, writes RESULTS.md "Decode: ONNX Runtime GenAI"
    python benchmarks/genai.py --contexts 512 --batches 1 --steps 8 --repeats 1 --no-write
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _decode_cells import THREADS, build, set_genai_threads  # noqa: E402
from _results import cpu_model, replace_section  # noqa: E402

SECTION = "## Decode: ONNX Runtime GenAI"
VARIANTS = ("mha", "dcmha")


def make_folder(variant: str, max_len: int, folder: Path) -> tuple[str, Path]:
    """The optimised decode graph of a random-weight LM and its GenAI folder (2 threads)."""
    import attn2onnx
    from attn2onnx.genai import write_genai_folder
    from attn2onnx.models.decode import export_decode

    decode, optimized = folder / "decode.onnx", folder / "decode.opt.onnx"
    export_decode(build(variant, max_len), decode)
    attn2onnx.optimize(decode, optimized, target="ort")
    genai = write_genai_folder(optimized, folder / "genai").path
    set_genai_threads(genai)
    return str(optimized), genai


def one_repetition(session, model, batch: int, context: int, steps: int, seed: int) -> tuple[list, list, int]:
    """Per-step ms of ours and of GenAI after a fresh prefill of ``context`` tokens each, one
    engine's steps after the other's (an odd ``seed`` runs GenAI first), and in how many steps
    the two picked the same tokens. Blocks, not single steps, alternate: the idle engine's ORT
    threads spin for a while after each run and would take the CPUs from the other."""
    import onnxruntime_genai as og

    ids = np.random.default_rng(seed).integers(0, 256, (batch, context))

    def run_ours() -> tuple[list, list]:
        times, tokens = [], []
        logits = session.prefill(ids)[:, -1]
        for _ in range(steps):
            start = time.perf_counter()
            tokens.append(logits.argmax(-1))
            logits = session.step(tokens[-1][:, None])[:, -1]
            times.append((time.perf_counter() - start) * 1e3)
        return times, tokens

    def run_theirs() -> tuple[list, list]:
        times, tokens = [], []
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=context + steps + 1, batch_size=batch)
        generator = og.Generator(model, params)
        generator.append_tokens(ids.astype(np.int32))
        for _ in range(steps):
            start = time.perf_counter()
            generator.generate_next_token()
            times.append((time.perf_counter() - start) * 1e3)
            tokens.append(generator.get_next_tokens())
        return times, tokens

    if seed % 2:
        theirs, ours = run_theirs(), run_ours()
    else:
        ours, theirs = run_ours(), run_theirs()
    same = sum(int(np.array_equal(a, b)) for a, b in zip(ours[1], theirs[1]))
    return ours[0], theirs[0], same


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=16, help="timed steps per repetition")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import onnxruntime_genai as og

    from attn2onnx.generate import DecodeSession

    args = parse(argv)
    started = time.time()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants:
            folder = Path(tmp) / variant
            folder.mkdir()
            optimized, genai = make_folder(variant, max(args.contexts) + args.steps + 2, folder)
            session, model = DecodeSession(optimized, threads=THREADS), og.Model(str(genai))
            for batch in args.batches:
                for context in args.contexts:
                    reps = [
                        one_repetition(session, model, batch, context, args.steps, seed) for seed in range(args.repeats)
                    ]
                    ours = statistics.median(statistics.median(r[0]) for r in reps)
                    theirs = statistics.median(statistics.median(r[1]) for r in reps)
                    same = sum(r[2] for r in reps)
                    rows.append((variant, batch, context, ours, theirs, same, args.steps * args.repeats))
                    print(f"{variant} B={batch} C={context}: ours {ours:.2f} ms, GenAI {theirs:.2f} ms", flush=True)
    table = [
        "| variant | B | context | attn2onnx generate step ms | GenAI step ms | GenAI / ours | same tokens |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for variant, batch, context, ours, theirs, same, total in rows:
        table.append(
            f"| {variant} | {batch} | {context} | {ours:.2f} | {theirs:.2f} | {theirs / ours:.2f}x | {same}/{total} |"
        )
    text = "\n".join(
        [
            SECTION,
            "",
            __doc__.split("\n\n", 1)[1].split("\n\n    python")[0].replace("\n", " "),
            "",
            f"- command: `{' '.join(['python benchmarks/genai.py', *(sys.argv[1:] if argv is None else argv)])}`",
            f"- date: {time.strftime('%Y-%m-%d')}; machine: {cpu_model()}, {os.cpu_count()} CPUs; "
            f"load average at the end {os.getloadavg()[0]:.1f}; {(time.time() - started) / 60:.1f} min in all",
            f"- onnxruntime-genai {og.__version__}",
            "",
            *table,
        ]
    )
    print(text)
    if not args.no_write:
        replace_section(SECTION, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
