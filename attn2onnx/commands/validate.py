"""Validate an exported model against its PyTorch reference with Polygraphy.

  attn2onnx validate model.onnx --reference model.pt
  attn2onnx validate model.onnx --reference model.pt --shapes 1x8,4x31,2x64 --json
  attn2onnx validate model.onnx --reference model.pt --backends ort,trt
  attn2onnx validate lm.decode.onnx --reference lm.pt --decode --steps 6     a graph exported with --decode

Polygraphy's Comparator runs a PyTorch reference runner and the ONNX Runtime runner (and
TensorRT where installed) on fresh random inputs at each BATCHxSEQ shape (default three),
with per-dtype tolerances. Exit 0 pass, 1 mismatch, 2 bad input. --json prints one object:
{"passed": bool, "comparisons": [{"backend", "shape", "max_abs_err", "max_rel_err", "passed"}]}.

--decode checks a decode graph: prefill of a prompt, then --steps one-token decode steps in ORT,
against PyTorch's full-sequence forward row by row, for left-padded batches whose rows start at
different points (shapes are BATCHxPROMPT; the default adds prompts around every local window so
the steps cross it). Its comparisons' shape is [batch, prompt, steps]."""
from __future__ import annotations

import argparse

from . import check_input_memory, positive_int, seed_int

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


def float_precision(model) -> str | None:
    """``fp32`` / ``fp16`` from the model's float inputs and weights (None if it has neither)."""
    import onnx

    names = {onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16"}
    types = [v.type.tensor_type.elem_type for v in model.graph.input] + [i.data_type for i in model.graph.initializer]
    found = [names[t] for t in types if t in names]
    return found[0] if found else None


def check_reference(path: str, model, specs: list, source, shape: tuple[int, int]) -> None:
    """Refuse (UsageError) a reference that is not the model's, in one line, before comparing:
    inputs of another kind or rank, ids past the reference's vocabulary (known for attn2onnx
    models), or outputs whose names, ranks or fixed sizes differ from the ONNX graph's at
    ``shape`` (the reference runs once there). Otherwise the comparison itself fails on them
    with an IndexError or a broadcast ValueError."""
    from ..errors import UsageError
    from ..io_spec import random_inputs
    from ..validate import TorchRunner

    vocab_known = hasattr(source.module, "config")
    for mine, ref in zip(specs, source.specs):
        if mine.kind != ref.kind or len(mine.dims) != len(ref.dims):
            raise UsageError(f"input {mine.name!r} of {path} is {mine.kind} {list(mine.dims)} "
                             f"but the reference takes {ref.kind} {list(ref.dims)}")
        if mine.kind == "ids" and vocab_known and mine.high > ref.high:
            raise UsageError(f"input {mine.name!r} of {path} takes ids in [0, {mine.high}) "
                             f"but the reference only in [0, {ref.high})")
    names = [o.name for o in model.graph.output]
    if names != list(source.output_names):
        raise UsageError(f"{path} gives outputs {names} but the reference gives {list(source.output_names)}")
    batch, seq = shape
    outputs = TorchRunner(source.module, specs, source.output_names).infer_impl(random_inputs(specs, batch, seq))
    sizes = {"batch": batch, "seq": seq}
    for output in model.graph.output:
        if not output.type.tensor_type.HasField("shape"):
            continue
        dims = [sizes.get(d.dim_param, d.dim_param) if d.dim_param else d.dim_value
                for d in output.type.tensor_type.shape.dim]
        got = list(outputs[output.name].shape)
        if len(dims) != len(got) or any(isinstance(d, int) and d and d != g for d, g in zip(dims, got)):
            raise UsageError(f"output {output.name!r} of {path} is {dims} at batch {batch} x seq {seq} but the "
                             f"reference's is {got}: is --reference the model it was exported from?")


def run(args: argparse.Namespace) -> int:
    import json

    from ..errors import UsageError
    from ..io_spec import METADATA_KEY, specs_from_onnx, with_precision
    from ..onnx_io import load_onnx
    from ..sources import load_source
    from ..validate import DEFAULT_SHAPES, TorchRunner, backend_runners, compare, parse_shapes, summary

    model = load_onnx(args.model)
    precision = float_precision(model)
    if precision is not None and precision != args.dtype:
        raise UsageError(f"{args.model} computes in {precision}; --dtype {args.dtype} does not match it")
    source = load_source(args.reference, trust_pickle=args.trust_pickle)
    if args.decode:
        return run_decode(args, model, source)
    onnx_specs = specs_from_onnx(model)
    onnx_names = [s.name for s in onnx_specs]
    if onnx_names != [s.name for s in source.specs]:
        raise UsageError(f"{args.model} takes inputs {onnx_names} but the reference takes {[s.name for s in source.specs]}")
    # Our exports record their input specs (fixed dims of a --static export, id ranges); for
    # other files, the reference's specs at the file's precision.
    has_specs = any(p.key == METADATA_KEY for p in model.metadata_props)
    specs = onnx_specs if has_specs else with_precision(source.specs, precision or "fp32")
    shapes = parse_shapes(args.shapes) if args.shapes else list(DEFAULT_SHAPES)
    if source.max_seq:
        too_long = [s for s in shapes if s[1] > source.max_seq]
        if too_long:
            raise UsageError(f"sequence length {too_long[0][1]} exceeds the model's maximum {source.max_seq}")
    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not names:
        raise UsageError(f"--backends {args.backends!r} names no backend; choose from ort, trt")
    check_input_memory(specs, shapes)
    check_reference(args.model, model, specs, source, shapes[0])
    backends = backend_runners(args.model, names, specs, shapes)
    reference = TorchRunner(source.module, specs, source.output_names)
    comparisons = compare(reference, backends, specs, shapes, dtype=args.dtype, seed=args.seed)
    result = summary(comparisons)
    if args.json:
        print(json.dumps(result))
    else:
        for c in comparisons:
            print(f"{c.backend:5s} {c.shape[0]}x{c.shape[1]:<5d} max abs {c.max_abs_err:.2e}  max rel {c.max_rel_err:.2e}  {'PASS' if c.passed else 'FAIL'}")
        print("PASSED" if result["passed"] else "FAILED")
    return 0 if result["passed"] else 1


def run_decode(args: argparse.Namespace, model, source) -> int:
    """validate --decode: the decode graph's prefill + steps against the full PyTorch forward."""
    import json

    from ..errors import UsageError
    from ..models.decode import check_decodable, read_decode_metadata
    from ..validate import compare_decode, decode_cases, parse_shapes, summary

    meta = read_decode_metadata(model, args.model)
    lm = check_decodable(source.module)
    if lm.config.vocab_size != meta["vocab_size"] or lm.config.variant != meta["variant"]:
        raise UsageError(f"{args.model} is a decode graph of a {meta['variant']} LM with vocabulary "
                         f"{meta['vocab_size']}, but the reference is a {lm.config.variant} LM with vocabulary "
                         f"{lm.config.vocab_size}")
    if args.backends.strip() != "ort":
        raise UsageError("--decode runs in ONNX Runtime only (--backends ort)")
    cases = parse_shapes(args.shapes) if args.shapes else decode_cases(meta, args.steps)
    too_long = [p for _, p in cases if p + args.steps > meta["max_len"]]
    if too_long:
        raise UsageError(f"prompt {too_long[0]} + {args.steps} steps exceeds the model's max_len {meta['max_len']}")
    result = summary(compare_decode(args.model, lm, cases, args.steps, dtype=args.dtype, seed=args.seed))
    if args.json:
        print(json.dumps(result))
    else:
        for c in result["comparisons"]:
            batch, prompt, steps = c["shape"]
            print(f"decode batch {batch} prompt {prompt:<4d} +{steps} steps  max abs {c['max_abs_err']:.2e}  "
                  f"max rel {c['max_rel_err']:.2e}  {'PASS' if c['passed'] else 'FAIL'}")
        print("PASSED" if result["passed"] else "FAILED")
    return 0 if result["passed"] else 1
