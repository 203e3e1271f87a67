"""Export a model to ONNX with the ai.attn2onnx op set, then check it against PyTorch.

  attn2onnx export model.pt -o model.onnx                 dynamic batch and sequence
  attn2onnx export model.pt -o model.onnx --static --batch 1 --seq-len 128
  attn2onnx export model.pt -o model.onnx --optimize --target ort
  attn2onnx export model.pt -o model.fp16.onnx --dtype fp16         half-precision graph
  attn2onnx export program.pt2 -o model.onnx              a torch.export program
  attn2onnx export module.pkl -o model.onnx --trust-pickle   a pickled nn.Module (runs its code!)
  attn2onnx export lm.pt -o lm.decode.onnx --decode        prefill + decode steps with caches as inputs/outputs
  attn2onnx export lm.pt -o lm.decode.onnx --decode --genai lm_genai/     also a folder ONNX Runtime GenAI runs
  attn2onnx export lm.pt -o lm.shared.onnx --decode --shared-kv           caches in shared max-length buffers
  attn2onnx export hf_llama/ -o m.onnx                    a Hugging Face transformers folder
  attn2onnx export lm.pt2 -o lm.decode.onnx --decode       a program taking and returning a KV cache (README)

Right after export, ONNX Runtime runs the file on fresh random inputs at two shapes and the
max abs / rel error against the PyTorch model (in fp32) is printed; exit 1 when out of the
--dtype's tolerance. With --decode the graph takes input_ids, attention_mask, position_ids and
every layer's cache (past_key_values.{i}.*) and gives logits and the updated caches (present.{i}.*);
the check then runs prefill + decode steps against PyTorch's full forward (validate --decode).
--atol / --rtol / --check-error-stat set the check's rule as for validate (each line prints it);
--save-inputs writes the inputs it fed, for validate --load-inputs to replay. --optimize runs
optimize's passes on the written graph (a decode graph too) before the check, which then checks
the optimised graph. A DCFormer release folder past 1 GiB of float32 weights exports streamed
(traced without weights, each weight written to external data from the shards as it is read):
peak memory stays below the weights' size.

A model of your own (a state_dict, a pickled module) exports as a torch.export program:
  torch.export.save(torch.export.export(model, (example_input,)), "model.pt2")
then attn2onnx export model.pt2 -o model.onnx. On a terminal, stderr names each stage."""

from __future__ import annotations

import argparse
import contextlib
from typing import Iterator

from . import check_input_memory, positive_int
from .optimize import add_native_option
from .validate import add_check_options, check_options, check_save_inputs, save_inputs

HELP = "export a model to ONNX (custom ops + function bodies) and check parity"
# torch's dynamo exporter implements ONNX opsets from 18 (lower ones go through a version
# converter that seldom succeeds) up to 23, the opset the ai.attn2onnx op bodies are written for
# (custom_ops BODY_OPSET): a model holding our ops exports at exactly that opset.
MIN_OPSET = 18


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        metavar="MODEL",
        help="attn2onnx checkpoint (.pt), torch.export program (.pt2), a Hugging Face transformers folder, "
        "or a DCFormer release folder (see 'attn2onnx convert')",
    )
    parser.add_argument("-o", "--output", required=True, metavar="OUT.onnx", help="ONNX file to write")
    parser.add_argument(
        "--opset",
        type=int,
        default=23,
        help=f"standard ONNX opset, {MIN_OPSET}-23 (default 23; models with ai.attn2onnx ops need 23)",
    )
    parser.add_argument("--static", action="store_true", help="fixed batch and sequence sizes instead of dynamic dims")
    parser.add_argument(
        "--batch", type=positive_int, help="example batch size (default 2; the fixed one with --static)"
    )
    parser.add_argument(
        "--seq-len", type=positive_int, help="example sequence length (default 16; the fixed one with --static)"
    )
    parser.add_argument(
        "--dtype",
        choices=("fp32", "fp16"),
        default="fp32",
        help="precision of the exported graph (fp16: weights and float inputs in half)",
    )
    parser.add_argument("--trust-pickle", action="store_true", help="allow a pickled nn.Module (unpickling runs code)")
    parser.add_argument("--trust-remote-code", action="store_true", help="run a transformers folder's own model code")
    parser.add_argument("--optimize", action="store_true", help="run the graph passes after export")
    parser.add_argument(
        "--target", choices=("ort", "trt", "portable"), default="ort", help="pass pipeline (with --optimize)"
    )
    add_native_option(parser)
    parser.add_argument("--no-check", action="store_true", help="skip the ORT vs PyTorch check")
    add_check_options(parser)  # the check's rule and --save-inputs, as validate's
    parser.add_argument(
        "--decode",
        action="store_true",
        help="causal LM: one graph for prefill and decode steps, caches as inputs and outputs",
    )
    parser.add_argument(
        "--shared-kv",
        action="store_true",
        help="with --decode: one max-length buffer per cache, bound as past and present and written in place "
        "(GroupQueryAttention; mha, optimised, efficient; the graph comes optimised for ort)",
    )
    parser.add_argument("--genai", metavar="DIR", help="with --decode: also write a folder ONNX Runtime GenAI runs")


def check_opset(opset: int) -> None:
    """Refuse, before any work, an opset the exporter or the op bodies cannot produce."""
    from ..custom_ops._common import BODY_OPSET
    from ..errors import UsageError

    if not MIN_OPSET <= opset <= BODY_OPSET:
        raise UsageError(
            f"--opset {opset} is not supported: torch's exporter and the ai.attn2onnx op bodies "
            f"support opsets {MIN_OPSET} to {BODY_OPSET} (models with ai.attn2onnx ops: {BODY_OPSET})"
        )


@contextlib.contextmanager
def opset_errors(opset: int) -> Iterator[None]:
    """A graph that fails onnx.checker at an opset other than the op bodies' one: a usage error
    naming the opset to use (the bodies of ai.attn2onnx ops need exactly their opset)."""
    import onnx

    from ..custom_ops._common import BODY_OPSET
    from ..errors import UsageError

    try:
        yield
    except onnx.checker.ValidationError as e:
        if opset == BODY_OPSET:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(
            f"--opset {opset}: the exported graph does not check at that opset ({first}); "
            f"models with ai.attn2onnx ops need --opset {BODY_OPSET}"
        ) from None


def check_paths(args: argparse.Namespace) -> None:
    """Refuse, before torch and the exporter are imported (seconds), an output that is no .onnx
    file or that export could not write or read back, a model path that does not exist, and an
    ONNX model (it needs no export: optimize or run it)."""
    from pathlib import Path

    from ..errors import UsageError
    from ..file_kinds import is_onnx_model, onnx_model_error, require_onnx_name
    from ..fileio import written_through

    require_onnx_name(args.output)
    if not Path(args.model).exists():  # load_source reads what is there (file or release folder)
        raise FileNotFoundError(f"no such file: {args.model}")
    if is_onnx_model(args.model):
        raise onnx_model_error(args.model)
    # a missing or mistyped folder fails before the export, not after; so does a pipe or device
    # the model could not be read back from
    if written_through(args.output) and (args.optimize or not args.no_check):
        raise UsageError(
            f"{args.output} is a pipe or device, which export cannot read back to check or optimize; add --no-check"
        )
    if args.shared_kv and not args.decode:
        raise UsageError("--shared-kv needs --decode (it shares the decode graph's cache buffers)")
    if args.genai is not None:
        from ..genai import check_request  # no torch

        check_request(args.genai, decode=args.decode, output=args.output)


# How to export a model attn2onnx cannot load itself (a state_dict, a pickled module).
PT2_RECIPE = "torch.export.save(torch.export.export(model, (example_input,)), 'model.pt2')"


def foreign_torch_file(path: str) -> bool:
    """Whether ``path`` is a PyTorch file holding some other model than an attn2onnx checkpoint:
    weights (a state_dict, a training checkpoint's dict) or pickled objects (a module), which
    export takes as a torch.export program instead. A second, weights-only look at the file, on
    the error path only; a damaged file, a program or an attn2onnx checkpoint is not one."""
    import pickle
    from pathlib import Path

    from ..checkpoint import FORMAT
    from ..file_kinds import is_pickle, is_torch_file
    from ..torch_files import load_weights_only

    if Path(path).suffix == ".pt2" or not is_torch_file(path):
        return False
    if is_pickle(path):  # a legacy torch.save or pickle.dump: never an attn2onnx checkpoint
        return True
    try:
        payload = load_weights_only(path)
    except pickle.UnpicklingError:  # objects the weights-only unpickler refuses: a pickled module
        return True
    except Exception:  # noqa: BLE001 - a damaged file: the loader's own error says so
        return False
    return not (isinstance(payload, dict) and payload.get("format") == FORMAT)


@contextlib.contextmanager
def pt2_hint(args: argparse.Namespace) -> Iterator[None]:
    """A model file that does not load because it is some other model than attn2onnx's
    (:func:`foreign_torch_file`): its one-line error also gives the torch.export route."""
    from ..errors import UsageError
    from ..file_kinds import quoted

    try:
        yield
    except UsageError as e:
        if not foreign_torch_file(args.model):
            raise
        raise UsageError(
            f"{e}; to export a model of your own, save it as a torch.export program: {PT2_RECIPE}, "
            f"then attn2onnx export model.pt2 -o {quoted(args.output)}"
        ) from None


def run(args: argparse.Namespace) -> int:
    check_paths(args)
    from ..progress import Progress

    progress = Progress.for_command()
    progress.stage("loading PyTorch and the exporter")
    import copy

    import torch

    from ..errors import UsageError
    from ..exporter import export
    from ..fileio import refuse_overwriting_inputs
    from ..io_spec import random_inputs, with_precision
    from ..onnx_io import output_files
    from ..sources import load_source
    from ..validate import check_parity, fixed_sizes, runnable_shapes

    check_opset(args.opset)
    refuse_overwriting_inputs(output_files(args.output), [args.model])
    check_flags(args)
    from ..streaming.command import export_release, streams

    if streams(args):  # a release folder past 1 GiB of float32 weights: streamed to external data
        return export_release(args)
    if args.decode:
        return run_decode(args, progress)
    progress.stage(f"loading {args.model}")
    with pt2_hint(args):
        source = load_source(args.model, trust_pickle=args.trust_pickle, trust_remote_code=args.trust_remote_code)
    specs = with_precision(source.specs, args.dtype)
    fixed = fixed_sizes(specs)  # a static program's own sizes
    batch, seq = source.fit(fixed.get("batch", 2), fixed.get("seq", 16))  # defaults inside the model's ranges
    batch, seq = args.batch or batch, args.seq_len or seq
    if source.max_seq and seq > source.max_seq:
        raise UsageError(f"--seq-len {seq} exceeds the model's maximum sequence length {source.max_seq}")
    runnable_shapes(specs, [(batch, seq)], requested=True)  # a --batch / --seq-len a static program cannot take
    source.check_shape(batch, seq)  # a --batch / --seq-len outside a program's Dim ranges
    check_input_memory(specs, [(batch, seq)])
    module = copy.deepcopy(source.module).half() if args.dtype == "fp16" else source.module
    example = [torch.from_numpy(a) for a in random_inputs(specs, batch, seq, pad=False).values()]
    progress.stage(f"exporting to ONNX (torch.onnx, opset {args.opset})")
    with opset_errors(args.opset):
        result = export(
            module,
            example,
            args.output,
            specs=specs,
            output_names=source.output_names,
            opset=args.opset,
            dynamic=not args.static,
            max_seq=source.max_seq,
        )
    print(
        f"wrote {result.path}: {result.nodes} nodes, {result.custom_nodes} ai.attn2onnx, "
        f"exported in {result.seconds:.1f} s"
    )
    optimize_written(args, progress)
    if args.no_check:
        return 0
    shapes = [(batch, seq)]
    if not args.static:
        shapes.append(source.fit(batch + 1, max(1, seq // 2 + 1)))
    shapes, _ = runnable_shapes(specs, shapes, requested=False)  # once each, as a static program takes them
    progress.stage("checking against PyTorch in ONNX Runtime")
    report = check_parity(result.path, source, shapes, dtype=args.dtype, progress=progress, **check_options(args))
    return finish_check(args, report)


def optimize_written(args: argparse.Namespace, progress) -> None:
    """With --optimize, run the target's passes on the written graph in place (the check that
    follows checks the optimised graph)."""
    if not args.optimize:
        return
    from ..passes import optimize

    progress.stage(f"optimizing for {args.target}")
    report = optimize(args.output, args.output, target=args.target, progress=progress, native=args.native_attention)
    print(f"optimized for {args.target}: {report.before.nodes} -> {report.after.nodes} nodes")


def check_flags(args: argparse.Namespace) -> None:
    """Refuse the check's options with --no-check (nothing would apply them), and a
    --save-inputs that would replace the model or the output, before the export."""
    from ..errors import UsageError
    from ..onnx_io import output_files

    given = [
        flag
        for flag, value in (("--atol", args.atol), ("--rtol", args.rtol), ("--save-inputs", args.save_inputs))
        if value is not None
    ] + (["--check-error-stat"] if args.check_error_stat != "elemwise" else [])
    if args.no_check and given:
        raise UsageError(f"--no-check skips the check, so its options do nothing: drop {', '.join(given)}")
    check_save_inputs(args, args.model, *output_files(args.output))


def finish_check(args: argparse.Namespace, report) -> int:
    """Save the check's inputs (--save-inputs), print it; the exit code."""
    from ..onnx_io import output_files

    save_inputs(args, report, args.model, *output_files(args.output))
    return print_check(report)


def print_check(report) -> int:
    """Print the check after export: what it fed (validate's header lines), then a line per
    comparison (validate.ParityReport) at the shape that ran; the exit code."""
    from .validate import header_lines

    for line in header_lines(report):
        print(line)
    for c in report.comparisons:
        sizes = dict(zip(("batch", "seq"), c.shape))
        where = (
            f"decode at batch={c.shape[0]} prompt={c.shape[1]} +{c.shape[2]} steps"
            if len(c.shape) == 3
            else f"{c.backend} at " + " ".join(f"{name}={size}" for name, size in sizes.items())
        )
        print(
            f"check {where}: max abs err {c.max_abs_err:.2e}, max rel err {c.max_rel_err:.2e} "
            f"({report.rule}{'; ' + str(c.float64) if c.float64 else ''}) {'ok' if c.passed else 'MISMATCH'}"
        )
    return 0 if report.passed else 1


DECODE_STEPS = 4  # decode steps of the check after a --decode export


def run_decode(args: argparse.Namespace, progress) -> int:
    """export --decode: the decode graph (attn2onnx.models.decode), optimised with --optimize,
    then prefill + decode steps in ORT checked against the PyTorch full forward."""
    from ..errors import UsageError
    from ..fileio import refuse_overwriting_inputs
    from ..models.decode import check_decodable, export_decode
    from ..onnx_io import output_files
    from ..sources import load_source
    from ..validate import check_parity

    for flag, given in (("--static", args.static), ("--dtype fp16", args.dtype == "fp16")):
        if given:
            raise UsageError(f"{flag} is not supported with --decode yet")
    if args.shared_kv and args.optimize and args.target != "ort":
        raise UsageError("--shared-kv writes a graph optimised for --target ort")
    refuse_overwriting_inputs(output_files(args.output), [args.model])
    progress.stage(f"loading {args.model}")
    with pt2_hint(args):
        source = load_source(args.model, trust_pickle=args.trust_pickle, trust_remote_code=args.trust_remote_code)
    if args.model.endswith(".pt2") and not hasattr(source.module, "decode_lm"):
        from ..importers.program_decode import EXPECTED

        raise UsageError(f"{args.model}: --decode needs a program that takes and returns a KV cache; {EXPECTED}")
    lm = check_decodable(source.module)
    if args.shared_kv:
        from ..models.shared_decode import check_shareable, export_shared_decode

        variant = getattr(getattr(lm, "config", None), "variant", type(lm).__name__)
        check_shareable(variant)
        if args.genai is not None:
            from ..genai import check_shared

            check_shared(variant)
    if args.genai is not None:
        from ..genai import check_export

        check_export(lm, args.genai)  # that GenAI can hold every layer's cache, before exporting
    progress.stage(f"exporting the decode graph to ONNX (torch.onnx, opset {args.opset})")
    with opset_errors(args.opset):
        result = (export_shared_decode if args.shared_kv else export_decode)(lm, args.output, opset=args.opset)
    print(
        f"wrote {result.path}: {result.nodes} nodes, {result.custom_nodes} ai.attn2onnx, {len(result.inputs) - 3} "
        f"cache inputs, exported in {result.seconds:.1f} s"
    )
    if not args.shared_kv:  # a shared-KV graph is optimised for ort already
        optimize_written(args, progress)
    code = 0
    if not args.no_check:
        progress.stage("checking prefill + decode steps against PyTorch in ONNX Runtime")
        code = finish_check(args, check_parity(result.path, lm, decode=True, steps=DECODE_STEPS, **check_options(args)))
    if args.genai is not None and code == 0:
        from ..genai import write_genai_folder

        print(write_genai_folder(result.path, args.genai).summary())
    return code
