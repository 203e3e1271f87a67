"""Wall time, peak memory and disk of each step on a release folder of a published size (issue 24).

    python scripts/make_release_checkpoint.py out/dcformer-2.8b --size 2.8b
    python benchmarks/real_sizes.py out/dcformer-2.8b --out out/rs28 --steps export-fp16 export-fp32
    python benchmarks/real_sizes.py out/dcformer-100m --out out/rs100m --steps in-memory-fp32 export-fp32

Each step runs in a child process that reports its own peak resident set size (VmHWM: a
child's ru_maxrss would count this process's size at the fork). Steps:

* ``export-fp16`` / ``export-fp32`` / ``decode-fp16`` / ``decode-fp32``: the streaming export
  (:func:`attn2onnx.streaming.export.export_streamed`), weights to external data;
* ``in-memory-fp32``: the in-memory path (import the folder in float32, ``attn2onnx.export``),
  for comparison on folders that fit;
* ``optimize-fp16``: ``attn2onnx optimize --target ort`` on the fp16 export (weights stay on
  disk, memory-mapped);
* ``quantize-int4``: ``attn2onnx quantize --weights int4`` of the fp16 decode graph (one weight
  at a time, streamed to external data);
* ``quantize-int4-acc4``: the same with ``--accuracy-level 4`` (int8 compute);
* ``generate-fp16`` / ``generate-int4`` / ``generate-int4-acc4``: ``attn2onnx generate`` on that
  decode graph, a 512-token prompt and 8 greedy tokens (batch 1): tokens/s of the decode steps,
  prefill seconds;
* ``validate-int4``: ``attn2onnx validate`` of the int4 decode graph against the folder
  (``--decode --shapes 1x16 --steps 2``: one prompt of 16, 2 steps): the reference in float32
  or, where that does not fit, bf16;
* ``agree-int4-acc4``: greedy agreement of that graph with the fp16 decode graph
  (:func:`attn2onnx.validate.greedy_agreement`, fixed random prompts).

Printed per step: wall s, peak RSS GiB, peak / output weight bytes, GB written. ``--json``
appends the rows to a file; ``--write-results`` puts them in RESULTS.md's "Real sizes" table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

STEPS = (
    "export-fp16",
    "export-fp32",
    "decode-fp16",
    "decode-fp32",
    "in-memory-fp32",
    "optimize-fp16",
    "quantize-int4",
    "quantize-int4-acc4",
    "generate-fp16",
    "generate-int4",
    "generate-int4-acc4",
    "agree-int4-acc4",
    "validate-int4",
)
PROMPT = 512  # default prompt tokens of the generate steps (ids 1..--prompt), then NEW_TOKENS greedy steps
NEW_TOKENS = 8
# agree-*: greedy agreement with the fp16 decode graph (teacher-forced, one session at a time)
# over AGREE_PROMPTS fixed prompts of AGREE_PROMPT random ids (seed 0), AGREE_TOKENS steps each.
AGREE_PROMPTS, AGREE_PROMPT, AGREE_TOKENS = 4, 32, 8


def _outputs(out: Path, step: str) -> Path:
    name = {
        "optimize-fp16": "fp16.opt", "quantize-int4": "decode-int4", "quantize-int4-acc4": "decode-int4-acc4",
        "generate-fp16": "decode-fp16", "generate-int4": "decode-int4", "generate-int4-acc4": "decode-int4-acc4",
        "agree-int4-acc4": "decode-int4-acc4", "validate-int4": "decode-int4",
    }.get(step, step)  # fmt: skip
    return out / f"{name}.onnx"


def run_step(step: str, folder: Path, out: Path, prompt: int = PROMPT) -> None:
    """One step, in this process (the child)."""
    target = _outputs(out, step)
    if step.startswith(("export-", "decode-")):
        from attn2onnx.streaming.export import export_streamed

        export_streamed(folder, target, dtype=step.split("-")[1], decode=step.startswith("decode"))
    elif step == "in-memory-fp32":
        from attn2onnx.cli import main

        assert main(["export", str(folder), "-o", str(target), "--no-check"]) == 0
    elif step == "optimize-fp16":
        from attn2onnx.cli import main

        assert main(["optimize", str(_outputs(out, "export-fp16")), "-o", str(target), "--target", "ort"]) == 0
    elif step.startswith("quantize-"):
        from attn2onnx.cli import main

        level = ["--accuracy-level", "4"] if step.endswith("acc4") else []
        assert (
            main(["quantize", str(_outputs(out, "decode-fp16")), "-o", str(target), "--weights", "int4", *level]) == 0
        )
    elif step == "validate-int4":
        from attn2onnx.cli import main

        argv = ["validate", str(target), "--reference", str(folder), "--decode", "--shapes", "1x16", "--steps", "2"]
        main([*argv, "--json"])
    elif step.startswith("agree-"):
        from attn2onnx.validate import greedy_agreement

        rng = np.random.default_rng(0)
        prompts = [rng.integers(1, 32000, AGREE_PROMPT).tolist() for _ in range(AGREE_PROMPTS)]
        share = greedy_agreement(target, _outputs(out, "decode-fp16"), prompts, AGREE_TOKENS)
        print(json.dumps({"agreement": share}))
    elif step.startswith("generate-"):
        from attn2onnx.cli import main

        ids = ",".join(str(i) for i in range(1, prompt + 1))
        assert main(["generate", str(target), "--prompt-ids", ids, "--max-new-tokens", str(NEW_TOKENS), "--json"]) == 0


def measure(step: str, folder: Path, out: Path, prompt: int = PROMPT) -> dict:
    """Run ``step`` in a child; wall s, peak RSS bytes, bytes of the output's weights (.data)."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, __file__, "--child", step, str(folder), "--out", str(out), "--prompt", str(prompt)],
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{step} failed:\n{done.stderr[-3000:]}")
    peak = int(done.stdout.split()[-1])
    target = _outputs(out, step)
    if step == "validate-int4":
        weights = Path(f"{target}.data").stat().st_size
        report = json.loads(done.stdout.strip().splitlines()[-2])
        worst = max(o["rel_err"] for c in report["comparisons"] for o in c["outputs"])
        return {"step": step, "wall_s": round(wall, 1), "peak_rss": peak, "weight_bytes": weights, "written": 0,
                "passed": report["passed"], "reference": report["reference"], "rel_err": worst}  # fmt: skip
    if step.startswith("agree-"):
        weights = Path(f"{target}.data").stat().st_size
        share = json.loads(done.stdout.strip().splitlines()[-2])["agreement"]
        return {"step": step, "wall_s": round(wall, 1), "peak_rss": peak, "weight_bytes": weights, "written": 0,
                "agreement": share}  # fmt: skip
    if step.startswith("generate-"):  # the output is the decode graph it read; its JSON line the speed
        speed = json.loads(done.stdout.strip().splitlines()[-2])
        weights = Path(f"{target}.data").stat().st_size
        return {
            "step": step, "wall_s": round(wall, 1), "peak_rss": peak, "weight_bytes": weights, "written": 0,
            "tokens_per_s": speed["tokens_per_s"], "prefill_s": speed["prefill_seconds"], "prompt": prompt,
        }  # fmt: skip
    files = [target, Path(f"{target}.data")]
    written = sum(f.stat().st_size for f in files if f.exists())
    data = Path(f"{target}.data")
    weights = data.stat().st_size if data.exists() else target.stat().st_size
    return {"step": step, "wall_s": round(wall, 1), "peak_rss": peak, "weight_bytes": weights, "written": written}


def row(r: dict) -> str:
    gib = 2**30
    return (
        f"| {r['folder']} | {r['step']} | {r['wall_s']:.0f} | {r['peak_rss'] / gib:.2f} | "
        f"{r['peak_rss'] / r['weight_bytes']:.2f} | {r['written'] / 1e9:.2f} |"
        + (
            f" {r['tokens_per_s']:.2f} tokens/s, prompt {r.get('prompt', PROMPT)} prefill {r['prefill_s']:.1f} s |"
            if "tokens_per_s" in r
            else ""
        )
        + (f" greedy agreement {r['agreement']:.0%} |" if "agreement" in r else "")
        + (
            f" {'passed' if r['passed'] else 'FAILED'}, {r['reference']} reference, rms rel {r['rel_err']:.2f} |"
            if "passed" in r
            else ""
        )
        + (" |" if not {"tokens_per_s", "agreement", "passed"} & set(r) else "")
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="folder for the outputs")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=["export-fp16", "export-fp32"])
    parser.add_argument("--child", choices=STEPS, help=argparse.SUPPRESS)
    parser.add_argument("--prompt", type=int, default=PROMPT, help=f"prompt tokens of generate (default {PROMPT})")
    parser.add_argument("--json", type=Path, help="append the rows to this JSON-lines file")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.child:
        run_step(args.child, args.folder, args.out, args.prompt)
        hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
        print(int(hwm.split()[1]) * 1024)
        return 0
    print("| folder | step | wall s | peak RSS GiB | peak / weight bytes | GB written | speed |")
    print("|---|---|---:|---:|---:|---:|---|")
    for step in args.steps:
        result = {"folder": args.folder.name, **measure(step, args.folder, args.out, args.prompt)}
        result["load"] = os.getloadavg()[0]
        print(row(result), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
