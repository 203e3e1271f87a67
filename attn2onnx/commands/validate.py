"""Validate an exported model against its PyTorch reference with Polygraphy.

  attn2onnx validate model.onnx --reference model.pt
  attn2onnx validate model.onnx --reference model.pt --shapes 1x8,4x31,2x64 --json
  attn2onnx validate model.onnx --reference model.pt --backends ort,trt
  attn2onnx validate lm.decode.onnx --reference lm.pt --decode --steps 6     a graph exported with --decode

Polygraphy's Comparator runs a PyTorch reference runner and the ONNX Runtime runner (and
TensorRT where installed) on fresh random inputs at each BATCHxSEQ shape (default three),
with per-dtype tolerances. Exit 0 pass, 1 mismatch, 2 bad input. --json prints one object:
{"passed": bool, "comparisons": [{"backend", "shape", "max_abs_err", "max_rel_err", "passed"}],
"fixed": {"batch": 1, "seq": 32} (sizes the graph fixes), "inputs": [what was drawn per input]}.
Each shape is the one fed: a graph with fixed sizes runs at them only, and a --shapes it cannot
take is an error.

--decode checks a decode graph: prefill of a prompt, then --steps one-token decode steps in ORT,
against PyTorch's full-sequence forward row by row, for left-padded batches whose rows start at
different points (shapes are BATCHxPROMPT; the default adds prompts around every local window so
the steps cross it). Its comparisons' shape is [batch, prompt, steps]."""

from __future__ import annotations

import argparse

from . import positive_int, seed_int

HELP = "compare an ONNX model with its PyTorch reference (Polygraphy)"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL.onnx")
    parser.add_argument("--reference", required=True, metavar="MODEL.pt", help="the PyTorch model it was exported from")
    parser.add_argument("--backends", default="ort", help="comma-separated: ort, trt (default ort)")
    parser.add_argument("--shapes", help="comma-separated BATCHxSEQ (default 1x5,2x16,3x33)")
    parser.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="tolerances (and input dtype) to use")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--trust-pickle", action="store_true", help="allow a pickled reference module (runs code)")
    parser.add_argument("--seed", type=seed_int, default=0, help="random input seed, 0 .. 2**64 - 1 (default 0)")
    parser.add_argument("--decode", action="store_true", help="check a decode graph: prefill + decode steps")
    parser.add_argument("--steps", type=positive_int, default=4, help="with --decode: decode steps (default 4)")


def run(args: argparse.Namespace) -> int:
    from ..errors import UsageError
    from ..validate import check_parity, parse_shapes

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not backends:
        raise UsageError(f"--backends {args.backends!r} names no backend; choose from ort, trt")
    shapes = parse_shapes(args.shapes) if args.shapes else None
    report = check_parity(
        args.model,
        args.reference,
        shapes,
        backends,
        args.dtype,
        seed=args.seed,
        trust_pickle=args.trust_pickle,
        decode=args.decode,
        steps=args.steps,
    )
    if args.json:
        print(report.to_json())
    else:
        for line in header_lines(report):
            print(line)
        for c in report.comparisons:
            print(describe(c))
        print("PASSED" if report.passed else "FAILED")
    return 0 if report.passed else 1


def header_lines(report) -> list[str]:
    """What a check fed (validate.ParityReport): one line per input saying what was drawn, and
    the sizes a fixed-shape graph was checked at (it runs at no other)."""
    from ..validate import describe_fixed

    lines = [f"input {line}" for line in report.inputs]
    if report.fixed:
        lines.append(f"{describe_fixed(report.fixed)}: the graph runs only there, so it is checked there")
    return lines


def describe(c) -> str:
    """One table row for a comparison (validate.Comparison): its shape is [batch, seq] as fed
    ([batch] for an image), a decode one's [batch, prompt, steps]."""
    errors = f"max abs {c.max_abs_err:.2e}  max rel {c.max_rel_err:.2e}  {'PASS' if c.passed else 'FAIL'}"
    if len(c.shape) == 3:
        batch, prompt, steps = c.shape
        return f"decode batch {batch} prompt {prompt:<4d} +{steps} steps  {errors}"
    return f"{c.backend:5s} {'x'.join(str(d) for d in c.shape):<7s} {errors}"
