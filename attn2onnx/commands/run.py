"""Run an ONNX model in ONNX Runtime (native kernels registered when built) or TensorRT.

  attn2onnx run model.onnx                                  random inputs (batch 1, seq 16)
  attn2onnx run model.onnx --inputs in.npz -o out.npz       inputs by graph input name
  attn2onnx run model.onnx --backend trt                    where TensorRT is installed
  attn2onnx run lm.decode.onnx --seq-len 1 --past 20        a decode graph: one step after 20 cached positions

Inputs are checked against the model's inputs (names, dtypes, ranks, fixed and shared dims)
before anything runs; outputs are written atomically as .npz. A decode graph (export --decode)
gets random inputs that keep its contract (every cache sized for --past positions, default 8 or
what max_len leaves; attention_mask of past + seq ones; positions past .. past + seq - 1), and
given inputs that break it (attention_mask's length not past + seq, a cache of another past)
are refused (attn2onnx.runtime.decode_inputs)."""

from __future__ import annotations

import argparse

from . import check_input_memory, non_negative_int, positive_int

HELP = "run an exported model on given or random inputs"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL.onnx")
    parser.add_argument("--inputs", metavar="IN.npz", help="inputs by graph input name (default: random)")
    parser.add_argument("-o", "--output", metavar="OUT.npz", help="write the outputs here")
    parser.add_argument("--backend", choices=("ort", "trt"), default="ort")
    parser.add_argument("--batch", type=positive_int, default=1, help="random inputs: batch size")
    parser.add_argument("--seq-len", type=positive_int, default=16, help="random inputs: sequence length")
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
    from ..exporter import MAX_SEQ_KEY

    limit = next((p.value for p in model.metadata_props if p.key == MAX_SEQ_KEY), None)
    spec = next((s for s in specs if "seq" in s.dims), None)
    if spec is None or limit is None or not limit.isdigit():  # not an attn2onnx export, or a static one
        return
    seq = feeds[spec.name].shape[spec.dims.index("seq")]
    if seq > int(limit):
        raise UsageError(f"sequence length {seq} exceeds the model's maximum sequence length {limit}")


def decode_metadata(model, path: str) -> dict | None:
    """The ``attn2onnx.decode`` description of the decode graph ``model`` read from ``path``;
    None for any other model."""
    from ..models.decode import DECODE_KEY, read_decode_metadata

    if not any(p.key == DECODE_KEY for p in model.metadata_props):
        return None
    return read_decode_metadata(model, path)


def random_feeds(specs: list, decode: dict | None, args: argparse.Namespace) -> dict:
    """Random inputs at --batch and --seq-len (a decode graph's after --past cached positions),
    once the memory check says they fit."""
    from ..errors import UsageError
    from ..io_spec import random_inputs
    from ..runtime.decode_inputs import choose_past, random_decode_inputs, sized_specs

    batch, seq = args.batch, args.seq_len
    if decode is None:
        if args.past is not None:
            raise UsageError("--past applies to decode graphs (attn2onnx export --decode) only")
        check_input_memory(specs, [(batch, seq)])
        return random_inputs(specs, batch, seq)
    past = choose_past(decode, seq, args.past)
    check_input_memory(sized_specs(specs, decode, past, seq), [(batch, seq)])
    return random_decode_inputs(specs, decode, batch, seq, past)


def run(args: argparse.Namespace) -> int:
    import time

    import numpy as np

    from ..fileio import atomic_output, refuse_overwriting_inputs
    from ..io_spec import check_feeds, specs_from_onnx
    from ..onnx_io import load_onnx, model_files
    from ..runtime.decode_inputs import check_decode_feeds

    model = load_onnx(args.model)
    if args.output:
        refuse_overwriting_inputs([args.output], [*model_files(args.model, model), args.inputs])
    specs = specs_from_onnx(model)
    decode = decode_metadata(model, args.model)
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

        sess = session(args.model, threads=args.threads)
        start = time.perf_counter()
        outputs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
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
