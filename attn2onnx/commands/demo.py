"""The main job: export, run in ONNX Runtime and validate every variant, in one table.

  attn2onnx demo                       writes demo_out/<variant>.onnx
  attn2onnx demo --out /tmp/d --json
  attn2onnx demo --variants dcmha,super

For every variant: a small 2-layer model in a family it fits (causal LM when the variant can
be causal, else a token encoder), exported with the ai.attn2onnx op set, optimised for ORT
(graph passes), both files validated against PyTorch at three dynamic shapes (fp32
tolerance), the optimised one timed against PyTorch at batch 1 x 64 tokens (both alike: one
thread each, warm-up, then interleaved runs, median of each; their ratio is the speed-up
column). On a terminal a bar shows the variant and its step.
Exit 0 only if every row passes."""

from __future__ import annotations

import argparse

HELP = "export, run and validate every variant (the main job)"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_out", metavar="DIR", help="folder for the ONNX files (default demo_out)")
    parser.add_argument("--variants", help="comma-separated subset (default: all)")
    parser.add_argument("--json", action="store_true", help="print the rows as one JSON list")


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from ..errors import UsageError
    from ..variants import check_name

    names = None if args.variants is None else [v.strip() for v in args.variants.split(",")]
    if names is not None and not any(names):
        raise UsageError(f"--variants takes a comma-separated list of variant names, got {args.variants!r}")
    for name in names or []:
        check_name(name)  # unknown names fail before any work, and before torch is imported

    from ..demo import format_table, rows_json, run_demo
    from ..progress import Progress

    rows = run_demo(Path(args.out), names, progress=Progress.for_command(json_output=args.json))
    print(json.dumps(rows_json(rows)) if args.json else format_table(rows))
    return 0 if rows and all(r.passed for r in rows) else 1
