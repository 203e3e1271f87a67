"""Run an ONNX model in ONNX Runtime (native kernels registered when built) or TensorRT.

  attn2onnx run model.onnx                                  random inputs (batch 1, seq 16)
  attn2onnx run static.onnx                                 a fixed-shape graph: random inputs at its shape
  attn2onnx run model.onnx --inputs in.npz -o out.npz       inputs by graph input name
  attn2onnx run model.onnx --backend trt                    where TensorRT is installed
  attn2onnx run lm.decode.onnx --seq-len 1 --past 20        a decode graph: one step after 20 cached positions

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

from . import check_input_memory, non_negative_int, positive_int

HELP = "run an exported model on given or random inputs"
DEFAULT_BATCH, DEFAULT_SEQ = 1, 16


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


def random_feeds(specs: list, decode, args: argparse.Namespace) -> dict:
    """Random inputs at --batch and --seq-len (a decode graph's after --past cached positions,
    a fixed-shape graph's at its own sizes), once the memory check says they fit."""
    from ..errors import UsageError
    from ..runtime.decode_inputs import choose_past, random_decode_inputs, sized_specs

    if decode is None:
        if args.past is not None:
            raise UsageError("--past applies to decode graphs (attn2onnx export --decode) only")
        return plain_random_feeds(specs, args)
    batch, seq = args.batch or DEFAULT_BATCH, args.seq_len or DEFAULT_SEQ
    past = choose_past(decode, seq, args.past)
    check_input_memory(sized_specs(specs, decode, past, seq), [(batch, seq)])
    return random_decode_inputs(specs, decode, batch, seq, past)


def plain_random_feeds(specs: list, args: argparse.Namespace) -> dict:
    """Random inputs of a graph other than a decode graph: its dims mapped to batch and seq
    (io_spec.batch_seq_specs), sizes the graph fixes kept (asking for others is an error),
    ids of unknown range fed as zeros; what the graph fixed or left unknown is printed."""
    import dataclasses

    from ..errors import UsageError
    from ..io_spec import batch_seq_specs, random_inputs
    from ..validate import describe_fixed, fixed_sizes

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
        print(f"random inputs at the model's {describe_fixed(fixed)} (the graph takes no other)")
    unknown = [s.name for s in specs if s.kind == "ids" and not s.high]
    if unknown:
        print(f"ids of unknown range fed as zeros: {', '.join(unknown)} (pass --inputs for real ones)")
        specs = [dataclasses.replace(s, high=1) if s.name in unknown else s for s in specs]
    check_input_memory(specs, [(batch, seq)])
    return random_inputs(specs, batch, seq)


def run(args: argparse.Namespace) -> int:
    from ..fileio import regular_file

    for path in (args.model, args.inputs):  # a missing file in one line, before onnx and the op set load
        if path:
            regular_file(path)
    import time

    import numpy as np

    from ..fileio import atomic_output, refuse_overwriting_inputs
    from ..io_spec import check_feeds, specs_from_onnx
    from ..onnx_io import load_onnx, model_files
    from ..runtime.decode_inputs import check_decode_feeds
    from ..runtime.metadata import read_decode

    model = load_onnx(args.model)
    if args.output:
        refuse_overwriting_inputs([args.output], [*model_files(args.model, model), args.inputs])
    specs = specs_from_onnx(model)
    decode = read_decode(model)
    feeds = load_npz(args.inputs) if args.inputs else random_feeds(specs, decode, args)
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
        with TrtSession(engine_for_shapes(args.model, [shape])) as sess:
            start = time.perf_counter()
            outputs = sess.run(feeds)
    else:
        from ..runtime import session
        from ..runtime.sessions import run_errors

        sess = session(args.model, threads=args.threads)
        start = time.perf_counter()
        with run_errors(args.model) as options:
            outputs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds, options)))
    ms = (time.perf_counter() - start) * 1e3
    for name, value in outputs.items():
        finite = "finite" if np.isfinite(value).all() else "NON-FINITE"
        print(f"{name}: shape {list(value.shape)} {value.dtype} ({finite})")
    print(f"ran in {ms:.2f} ms on {args.backend}")
    if args.output:
        with atomic_output(args.output) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **outputs)
        print(f"wrote {args.output}")
    return 0
