"""Validate an exported model against its PyTorch reference with Polygraphy.

  attn2onnx validate model.onnx --reference model.pt
  attn2onnx validate model.onnx --reference model.pt --shapes 1x8,4x31,2x64 --json
  attn2onnx validate model.onnx --reference model.pt --backends ort,trt
  attn2onnx validate lm.decode.onnx --reference lm.pt --decode --steps 6     a graph exported with --decode
  attn2onnx validate model.onnx --reference model.pt --atol 1e-4 --check-error-stat mean --save-inputs in.npz
  attn2onnx validate model.onnx --reference model.pt --load-inputs in.npz    replay exactly those cases

Polygraphy's Comparator runs a PyTorch reference runner and the ONNX Runtime runner (and
TensorRT where installed) on fresh random inputs at each BATCHxSEQ shape (default three),
with per-dtype tolerances. Exit 0 pass, 1 mismatch, 2 bad input. --json prints one object:
{"passed": bool, "comparisons": [{"backend", "shape", "max_abs_err", "max_rel_err", "passed"}],
"fixed": {"batch": 1, "seq": 32} (sizes the graph fixes), "inputs": [what was drawn per input]}.
Each shape is the one fed: a graph with fixed sizes runs at them only, and a --shapes it cannot
take is an error. Each comparison also lists "outputs": [{"name", "abs_err", "rel_err",
"passed"}], and "tolerance": {"dtype", "atol", "rtol", "stat"} is the rule they were judged by
(printed with the verdict): --atol / --rtol override the --dtype's, and --check-error-stat picks
Polygraphy's statistic (elemwise: every element within atol or rtol; max / mean / median: that
statistic of the absolute errors within atol or of the relative errors, |got-want| / |want|,
within rtol). --save-inputs writes every tensor fed, per case, to an .npz that --load-inputs
replays exactly (attn2onnx.input_cases).

--decode checks a decode graph: prefill of a prompt, then --steps one-token decode steps in ORT,
against PyTorch's full-sequence forward row by row, for left-padded batches whose rows start at
different points (shapes are BATCHxPROMPT; the default adds prompts around every local window so
the steps cross it). Its comparisons' shape is [batch, prompt, steps]. A graph exported with
--decode says so in its metadata and is checked this way without the flag; --dtype defaults to
the graph's own precision (fp16 for an --dtype fp16 export)."""

from __future__ import annotations

import argparse

from . import non_negative_float, positive_int, seed_int

HELP = "compare an ONNX model with its PyTorch reference (Polygraphy)"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL.onnx")
    parser.add_argument("--reference", required=True, metavar="MODEL.pt", help="the PyTorch model it was exported from")
    parser.add_argument("--backends", default="ort", help="comma-separated: ort, trt (default ort)")
    parser.add_argument("--shapes", help="comma-separated BATCHxSEQ (default 1x5,2x16,3x33)")
    parser.add_argument(
        "--dtype",
        choices=("fp32", "fp16"),
        help="tolerances (and input dtype) to use (default: the graph's own precision, fp32 where it has none)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--trust-pickle", action="store_true", help="allow a pickled reference module (runs code)")
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="run a transformers folder's own model code (the reference)"
    )
    parser.add_argument("--seed", type=seed_int, default=0, help="random input seed, 0 .. 2**64 - 1 (default 0)")
    parser.add_argument(
        "--decode",
        action="store_true",
        help="check a decode graph: prefill + decode steps (the default for a graph exported with --decode)",
    )
    parser.add_argument("--steps", type=positive_int, help="with --decode: decode steps (default 4)")
    add_check_options(parser)
    parser.add_argument(
        "--load-inputs",
        metavar="FILE.npz",
        help="replay the cases a --save-inputs wrote (their shapes and values) instead of --shapes",
    )


def add_check_options(parser: argparse.ArgumentParser) -> None:
    """The options of a parity check that validate and export's check share: the rule
    (attn2onnx.tolerances) and where to save the inputs fed."""
    from ..tolerances import ERROR_STATS

    parser.add_argument(
        "--atol", type=non_negative_float, help="absolute tolerance (default per --dtype: fp32 1e-5, fp16 1e-2)"
    )
    parser.add_argument(
        "--rtol", type=non_negative_float, help="relative tolerance (default per --dtype: fp32 1e-5, fp16 1e-2)"
    )
    parser.add_argument(
        "--check-error-stat",
        choices=ERROR_STATS,
        default="elemwise",
        help="per output, as Polygraphy: every element within atol or rtol (elemwise, default), or the "
        "max / mean / median absolute error within atol or relative error within rtol",
    )
    parser.add_argument(
        "--save-inputs", metavar="FILE.npz", help="write every input fed, per case, for a replay with --load-inputs"
    )


def check_options(args: argparse.Namespace) -> dict:
    """check_parity's keyword arguments for the options of :func:`add_check_options`."""
    return {"atol": args.atol, "rtol": args.rtol, "error_stat": args.check_error_stat}


def check_save_inputs(args: argparse.Namespace, *inputs: str | None) -> None:
    """Refuse, before the check runs, a --save-inputs that would replace one of ``inputs`` or
    that cannot be written there."""
    from ..fileio import check_destination, refuse_overwriting_inputs

    if args.save_inputs:
        refuse_overwriting_inputs([args.save_inputs], inputs)
        check_destination(args.save_inputs)


def save_inputs(args: argparse.Namespace, report, *inputs: str | None) -> None:
    """Write the report's fed cases to --save-inputs (input_cases.save_cases), where given."""
    from ..input_cases import save_cases

    if args.save_inputs:
        save_cases(args.save_inputs, report.fed, inputs=inputs)


def run(args: argparse.Namespace) -> int:
    from ..errors import UsageError
    from ..file_kinds import is_onnx_model
    from ..fileio import regular_file

    regular_file(args.model)  # a missing model in one line, before torch is imported
    from ..progress import Progress
    from ..validate import check_parity, parse_shapes

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not backends:
        raise UsageError(f"--backends {args.backends!r} names no backend; choose from ort, trt")
    shapes = parse_shapes(args.shapes) if args.shapes is not None else None  # "" names no shape: an error
    inputs = None
    if args.load_inputs:
        from ..input_cases import cases_from_arrays
        from .run import load_npz

        if shapes is not None or args.steps:
            raise UsageError("--load-inputs replays the saved cases at their shapes and steps: drop --shapes / --steps")
        inputs = cases_from_arrays(load_npz(args.load_inputs), args.load_inputs)
    check_save_inputs(args, args.model, args.reference, args.load_inputs)
    precision, decode = graph_kind(args.model)
    if precision == "bf16":
        raise UsageError(f"{args.model} computes in bf16; validate checks fp32 and fp16 graphs")
    if is_onnx_model(args.reference):
        raise UsageError(
            f"--reference {args.reference} is an ONNX model; give the PyTorch model {args.model} was exported "
            "from (.pt checkpoint, .pt2 program)"
        )
    report = check_parity(
        args.model,
        args.reference,
        shapes,
        backends,
        args.dtype or precision or "fp32",
        seed=args.seed,
        trust_pickle=args.trust_pickle,
        trust_remote_code=args.trust_remote_code,
        decode=args.decode or decode,
        steps=args.steps or 4,
        inputs=inputs,
        progress=Progress.for_command(json_output=args.json),
        **check_options(args),
    )
    save_inputs(args, report, args.model, args.reference, args.load_inputs)
    if args.json:
        print(report.to_json())
    else:
        if decode and not args.decode:
            print(f"{args.model} is a decode graph (its metadata says so): checked as --decode, prefill + decode steps")
        for line in header_lines(report):
            print(line)
        for c in report.comparisons:
            print(describe(c))
            for o in c.outputs:
                print(f"    {describe_output(o, report.rule)}")
        print(f"{'PASSED' if report.passed else 'FAILED'} ({report.rule})")
        if args.save_inputs:
            print(f"saved the inputs of {len(report.fed)} cases to {args.save_inputs}")
    return 0 if report.passed else 1


def graph_kind(path: str) -> tuple[str | None, bool]:
    """What the ONNX model at ``path`` says of itself: its precision (validate.float_precision:
    fp32 / fp16; bf16 for bf16 inputs or weights without those; None without float values) and
    whether it is a decode graph (export --decode's metadata), so that validate needs no --dtype /
    --decode the file already answers. A file that does not parse gives (None, False): the
    check's loader then says what is wrong with it."""
    import onnx

    from ..file_kinds import is_onnx_model
    from ..models.decode import DECODE_KEY
    from ..validate import float_precision

    if not is_onnx_model(path):  # no parse of a PyTorch file, a FIFO, ...
        return None, False
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception:  # noqa: BLE001 - protobuf raises several unrelated types; load_onnx words them
        return None, False
    decode = any(p.key == DECODE_KEY for p in model.metadata_props)
    types = [v.type.tensor_type.elem_type for v in model.graph.input] + [i.data_type for i in model.graph.initializer]
    bf16 = onnx.TensorProto.BFLOAT16 in types
    return float_precision(model) or ("bf16" if bf16 else None), decode


def describe_output(o, rule) -> str:
    """One output of a comparison (tolerances.OutputError) under ``rule`` (its statistic)."""
    stat = "max" if rule.stat == "elemwise" else rule.stat
    return f"{o.name}: {stat} abs {o.abs_err:.2e}  {stat} rel {o.rel_err:.2e}  {'pass' if o.passed else 'FAIL'}"


def header_lines(report) -> list[str]:
    """What a check fed (validate.ParityReport): one line per input saying what was drawn, and
    the sizes a fixed-shape graph was checked at (it runs at no other)."""
    from ..validate import describe_fixed

    lines = [f"input {line}" for line in report.inputs]
    if report.fixed:
        lines.append(f"{describe_fixed(report.fixed)}: the graph runs only there, so it is checked there")
    if report.reference == "bf16":
        lines.append("reference: the release folder in bf16 (its float32 does not fit beside the graph's session here)")
    elif report.reference:
        lines.append(f"reference: the release folder in {report.reference}")
    return lines


def describe(c) -> str:
    """One table row for a comparison (validate.Comparison): its shape is [batch, seq] as fed
    ([batch] for an image), a decode one's [batch, prompt, steps]."""
    errors = f"max abs {c.max_abs_err:.2e}  max rel {c.max_rel_err:.2e}  {'PASS' if c.passed else 'FAIL'}"
    errors += f"  ({c.float64})" if c.float64 else ""
    if len(c.shape) == 3:
        batch, prompt, steps = c.shape
        return f"decode batch {batch} prompt {prompt:<4d} +{steps} steps  {errors}"
    return f"{c.backend:5s} {'x'.join(str(d) for d in c.shape):<7s} {errors}"
