"""Run an ONNX model in ONNX Runtime (native kernels registered when built) or TensorRT.

  attn2onnx run model.onnx                                  random inputs (batch 1, seq 16)
  attn2onnx run static.onnx                                 a fixed-shape graph: random inputs at its shape
  attn2onnx run model.onnx --inputs in.npz -o out.npz       inputs by graph input name
  attn2onnx run model.onnx --backend trt                    where TensorRT is installed
  attn2onnx run lm.decode.onnx --seq-len 1 --past 20        a decode graph: one step after 20 cached positions
  attn2onnx run model.onnx --warmup 5 --iterations 100      timing: min / median / p90 of 100 runs
  attn2onnx run model.onnx --json                           one JSON object: outputs, timing, provider, threads

The model runs --warmup times untimed (default 1), then --iterations times timed (default 10);
the timing line gives median / min / p90 in ms with the backend, its execution provider and
the intra-op thread count (as polygraphy --iterations and onnxruntime_perf_test do). Outputs
are those of the last run.

Inputs are checked against the model's inputs (names, dtypes, ranks, fixed and shared dims)
before anything runs; outputs are written atomically as .npz. A decode graph (export --decode)
gets random inputs that keep its contract (every cache sized for --past positions, default 8 or
what max_len leaves; attention_mask of past + seq ones; positions past .. past + seq - 1), and
given inputs that break it (attention_mask's length not past + seq, a cache of another past)
are refused (attn2onnx.runtime.decode_inputs). A graph that fixes its batch or sequence length
(export --static) runs at its own sizes, and says so; --batch / --seq-len it cannot take are an
error. A graph from elsewhere runs on random inputs too: its dims named as Hugging Face's
(batch_size, sequence_length) or otherwise map to batch and seq, integer inputs to a 0/1 mask
(*mask*), positions (*position*) or zeros (ids of unknown range)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Callable

from . import check_input_memory, non_negative_int, positive_int

HELP = "run an exported model on given or random inputs"
DEFAULT_BATCH, DEFAULT_SEQ = 1, 16
DEFAULT_WARMUP, DEFAULT_ITERATIONS = 1, 10

if TYPE_CHECKING:
    from ..progress import Progress
    from ..timing import Timing


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL.onnx")
    parser.add_argument("--inputs", metavar="IN.npz", help="inputs by graph input name (default: random)")
    parser.add_argument("-o", "--output", metavar="OUT.npz", help="write the outputs here")
    parser.add_argument("--backend", choices=("ort", "trt"), default="ort")
    parser.add_argument("--batch", type=positive_int, help=f"random inputs: batch size (default {DEFAULT_BATCH})")
    parser.add_argument("--seq-len", type=positive_int, help=f"random inputs: sequence length (default {DEFAULT_SEQ})")
    parser.add_argument(
        "--past", type=non_negative_int, help="random inputs of a decode graph: cached positions (default 8)"
    )
    add_threads_option(parser)
    parser.add_argument(
        "--warmup", type=non_negative_int, default=DEFAULT_WARMUP, help=f"untimed runs first (default {DEFAULT_WARMUP})"
    )
    parser.add_argument(
        "--iterations",
        type=positive_int,
        default=DEFAULT_ITERATIONS,
        help=f"timed runs: min / median / p90 (default {DEFAULT_ITERATIONS})",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object (outputs, timing, provider)")


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """The --threads option of the commands that run a model (run, generate)."""
    from ..runtime.sessions import thread_limit

    parser.add_argument("--threads", type=thread_count, help=f"ORT intra-op threads (1 .. {thread_limit()})")


def thread_count(text: str) -> int:
    """argparse type of --threads: 1 .. thread_limit() (attn2onnx.runtime.sessions), the bound
    that session() applies too."""
    from ..errors import UsageError
    from ..runtime.sessions import check_threads

    try:
        return check_threads(positive_int(text))
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("threads ")) from None


def load_npz(path: str) -> dict:
    """Arrays of an .npz file; a clear error for anything else (pickled objects refused, an
    empty or damaged file, a .npy array, a pipe or device that would block the read)."""
    import zipfile

    import numpy as np

    from ..errors import UsageError
    from ..fileio import regular_file

    regular_file(path)
    try:
        data = np.load(path, allow_pickle=False)
        if isinstance(data, np.ndarray):
            raise ValueError("a single .npy array, not an .npz archive of named arrays")
        with data:
            return {k: data[k] for k in data.files}
    except (ValueError, EOFError, OSError, zipfile.BadZipFile) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"{path}: not a readable .npz of arrays ({first})") from None


def check_seq_len(model, specs: list, feeds: dict) -> None:
    """Refuse feeds whose sequence is longer than the model takes (the max_seq that export
    records in the model's metadata), before ONNX Runtime fails on it mid-graph."""
    from ..errors import UsageError
    from ..runtime.metadata import read_max_seq

    limit = read_max_seq(model)
    spec = next((s for s in specs if "seq" in s.dims), None)
    if spec is None or limit is None:  # not an attn2onnx export, or a static one
        return
    seq = feeds[spec.name].shape[spec.dims.index("seq")]
    if seq > limit:
        raise UsageError(f"sequence length {seq} exceeds the model's maximum sequence length {limit}")


def random_feeds(specs: list, decode, args: argparse.Namespace, note: Callable[[str], None]) -> dict:
    """Random inputs at --batch and --seq-len (a decode graph's after --past cached positions,
    a fixed-shape graph's at its own sizes), once the memory check says they fit; ``note``
    takes what the user should know about them."""
    from ..errors import UsageError
    from ..runtime.decode_inputs import choose_past, random_decode_inputs, sized_specs

    if decode is None:
        if args.past is not None:
            raise UsageError("--past applies to decode graphs (attn2onnx export --decode) only")
        return plain_random_feeds(specs, args, note)
    batch, seq = args.batch or DEFAULT_BATCH, args.seq_len or DEFAULT_SEQ
    past = choose_past(decode, seq, args.past)
    check_input_memory(sized_specs(specs, decode, past, seq), [(batch, seq)])
    return random_decode_inputs(specs, decode, batch, seq, past)


def plain_random_feeds(specs: list, args: argparse.Namespace, note: Callable[[str], None]) -> dict:
    """Random inputs of a graph other than a decode graph: its dims mapped to batch and seq
    (io_spec.batch_seq_specs), sizes the graph fixes kept (asking for others is an error),
    ids of unknown range fed as zeros; what the graph fixed or left unknown is printed."""
    import dataclasses

    from ..errors import UsageError
    from ..io_spec import batch_seq_specs, describe_fixed, fixed_sizes, random_inputs

    specs = batch_seq_specs(specs)
    fixed = fixed_sizes(specs)
    asked = {"batch": args.batch, "seq": args.seq_len}
    for name, size in fixed.items():
        if asked[name] is not None and asked[name] != size:
            option = "--batch" if name == "batch" else "--seq-len"
            raise UsageError(
                f"{option} {asked[name]}: the model has a {describe_fixed(fixed)} and cannot run at another; "
                f"run it without {option} (at its own size) or export it with dynamic shapes"
            )
    batch = fixed.get("batch", args.batch or DEFAULT_BATCH)
    seq = fixed.get("seq", args.seq_len or DEFAULT_SEQ)
    if fixed:
        note(f"random inputs at the model's {describe_fixed(fixed)} (the graph takes no other)")
    unknown = [s.name for s in specs if s.kind == "ids" and not s.high]
    if unknown:
        note(f"ids of unknown range fed as zeros: {', '.join(unknown)} (pass --inputs for real ones)")
        specs = [dataclasses.replace(s, high=1) if s.name in unknown else s for s in specs]
    check_input_memory(specs, [(batch, seq)])
    return random_inputs(specs, batch, seq)


def timed(call: Callable[[], dict], args: argparse.Namespace, progress: Progress) -> tuple[dict, Timing]:
    """The outputs of the last of --warmup + --iterations calls of ``call`` and the Timing of
    the timed ones, a bar over the runs on a terminal."""
    from ..timing import time_calls

    last: list[dict] = []

    def once() -> None:
        last[:] = [call()]  # only the latest outputs stay in memory

    with progress.bar(args.warmup + args.iterations, "running", unit="run") as bar:
        timing = time_calls({"run": once}, args.warmup, args.iterations, step=bar.update)["run"]
    return last[0], timing


def run(args: argparse.Namespace) -> int:
    from ..fileio import regular_file

    for path in (args.model, args.inputs):  # a missing file in one line, before onnx and the op set load
        if path:
            regular_file(path)
    import json

    import numpy as np

    from ..fileio import atomic_output, refuse_overwriting_inputs
    from ..io_spec import check_feeds, specs_from_onnx
    from ..onnx_io import load_onnx, model_files
    from ..progress import Progress
    from ..runtime.decode_inputs import check_decode_feeds
    from ..runtime.metadata import read_decode

    progress = Progress.for_command(json_output=args.json)
    notes: list[str] = []
    model = load_onnx(args.model)
    if args.output:
        refuse_overwriting_inputs([args.output], [*model_files(args.model, model), args.inputs])
    specs = specs_from_onnx(model)
    decode = read_decode(model)
    feeds = load_npz(args.inputs) if args.inputs else random_feeds(specs, decode, args, notes.append)
    check_feeds(specs, feeds)
    check_seq_len(model, specs, feeds)
    if decode is not None:
        check_decode_feeds(decode, feeds)
    if args.backend == "trt":
        from ..custom_ops import check_model
        from ..runtime.tensorrt import TrtSession, engine_for_shapes

        check_model(model)  # what session() does for ORT: every ai.attn2onnx node against its rules

        first = next(iter(feeds.values()))
        shape = (first.shape[0], first.shape[1] if first.ndim > 1 else 1)
        progress.stage("building (or loading the cached) TensorRT engine")
        with TrtSession(engine_for_shapes(args.model, [shape])) as sess:
            outputs, timing = timed(lambda: sess.run(feeds), args, progress)
        provider, threads = "TensorRT", None
    else:
        from ..runtime import session
        from ..runtime.sessions import run_errors

        progress.stage("loading the model into ONNX Runtime")
        sess = session(args.model, threads=args.threads)
        names = [o.name for o in sess.get_outputs()]
        with run_errors(args.model) as options:
            outputs, timing = timed(lambda: dict(zip(names, sess.run(None, feeds, options))), args, progress)
        provider = sess.get_providers()[0]
        threads = sess.get_session_options().intra_op_num_threads or None  # 0: ORT's default
    described = [
        {"name": name, "shape": list(value.shape), "dtype": str(value.dtype), "finite": bool(np.isfinite(value).all())}
        for name, value in outputs.items()
    ]
    if args.output:
        with atomic_output(args.output) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **outputs)
    if args.json:  # stdout is one JSON document
        doc = {
            "model": args.model,
            "backend": args.backend,
            "provider": provider,
            "threads": threads,
            "timing": timing.to_dict(),
            "outputs": described,
            "notes": notes,
            "wrote": args.output,
        }
        print(json.dumps(doc))
        return 0
    for line in notes:
        print(line)
    for out in described:
        print(f"{out['name']}: shape {out['shape']} {out['dtype']} ({'finite' if out['finite'] else 'NON-FINITE'})")
    count = "default threads" if threads is None else f"{threads} thread{'s' if threads != 1 else ''}"
    where = provider if args.backend == "trt" else f"ORT {provider}, {count}"
    print(f"ran in {timing} on {where}")
    if args.output:
        print(f"wrote {args.output}")
    return 0
