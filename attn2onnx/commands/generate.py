"""Generate tokens with a decode graph (attn2onnx export MODEL -o lm.onnx --decode) in ONNX Runtime.

  attn2onnx generate lm.onnx --prompt "Beautiful is " --max-new-tokens 64
  attn2onnx generate lm.onnx --prompt-ids 1,2,3 --max-new-tokens 8 --temperature 0.8 --top-k 20 --seed 1
  attn2onnx generate lm.onnx --prompt "Hi" --json

The prompt runs once (prefill), then one decode step per token with the caches carried in ORT
values; greedy unless --temperature > 0 or --top-k is given: --top-k alone samples at temperature
1 (a top-k with greedy picking would do nothing; stderr says so), and --top-k with --temperature 0
is refused. A text prompt is encoded as UTF-8 bytes, for models whose vocabulary holds the 256
byte values; any other model takes --prompt-ids. A last line on stderr gives the speed in
tokens/s. --json prints one object: prompt_ids, tokens, text (byte vocabularies), stopped (eos or
max_new_tokens), prefill_seconds, decode_seconds, tokens_per_s."""

from __future__ import annotations

import argparse

from . import non_negative_float, non_negative_int, positive_int
from .run import add_threads_option

HELP = "generate tokens with a decode graph (prefill once, then one step per token)"
BYTE_VOCAB = 256
SAMPLING_TEMPERATURE = 1.0  # --top-k without --temperature samples at this one


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL.onnx", help="a graph exported with --decode")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="text, encoded as UTF-8 bytes (models with a 256-byte vocabulary)")
    prompt.add_argument("--prompt-ids", metavar="IDS", help="comma-separated token ids, e.g. 1,2,3")
    parser.add_argument("--max-new-tokens", type=positive_int, default=32, help="tokens to generate (default 32)")
    parser.add_argument(
        "--temperature",
        type=non_negative_float,
        help=f"0 = greedy (the default; {SAMPLING_TEMPERATURE:g} with --top-k)",
    )
    parser.add_argument(
        "--top-k",
        type=non_negative_int,
        default=0,
        help=f"sample among the k likeliest (0 = all); alone, at temperature {SAMPLING_TEMPERATURE:g}",
    )
    parser.add_argument("--seed", type=non_negative_int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--eos-id", type=non_negative_int, help="stop after this token")
    add_threads_option(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the text")


def parse_ids(text: str) -> list[int]:
    """``"1,2,3"`` -> [1, 2, 3]; a one-line error for anything else."""
    from ..errors import UsageError

    try:
        ids = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise UsageError(f"--prompt-ids {text!r}: expected comma-separated integers, e.g. 1,2,3") from None
    return ids


def prompt_ids(args: argparse.Namespace, vocab_size: int) -> tuple[list[int], bool]:
    """The prompt as token ids, and whether the ids are bytes (so the output decodes as text)."""
    from ..errors import UsageError

    if args.prompt_ids is not None:
        return parse_ids(args.prompt_ids), vocab_size == BYTE_VOCAB
    if vocab_size < BYTE_VOCAB:
        raise UsageError(
            f"this model's vocabulary has {vocab_size} ids, too few for UTF-8 bytes: pass the prompt as --prompt-ids"
        )
    return list(args.prompt.encode("utf-8")), vocab_size == BYTE_VOCAB


def temperature(args: argparse.Namespace) -> float:
    """The sampling temperature asked for: --temperature, else greedy (0), except that --top-k
    alone samples at :data:`SAMPLING_TEMPERATURE` (greedy picking ignores a top-k, so it was
    silently greedy). A --top-k with --temperature 0 is a UsageError: it would do nothing."""
    from ..errors import UsageError

    if args.temperature is None:
        return SAMPLING_TEMPERATURE if args.top_k else 0.0
    if args.temperature == 0 and args.top_k:
        raise UsageError(
            f"--top-k {args.top_k} samples, which --temperature 0 (greedy) does not: drop one of them "
            f"(--top-k alone samples at temperature {SAMPLING_TEMPERATURE:g})"
        )
    return args.temperature


def run(args: argparse.Namespace) -> int:
    import codecs
    import json
    import sys

    from ..file_kinds import is_torch_file, torch_file_error
    from ..fileio import regular_file
    from ..generate import DecodeSession, check_request, generate
    from ..progress import Progress, shown

    sampling = temperature(args)
    regular_file(args.model)  # a missing model in one line, before onnx and the op set load
    if is_torch_file(args.model):
        raise torch_file_error(args.model, "--decode")

    session = DecodeSession(args.model, threads=args.threads)
    ids, as_bytes = prompt_ids(args, session.vocab_size)
    check_request(session, ids, args.max_new_tokens)  # before the prompt is echoed
    if args.prompt is not None:
        print(f"prompt encoded as UTF-8 bytes (vocabulary {session.vocab_size})", file=sys.stderr)
    if args.temperature is None and args.top_k:
        print(
            f"sampling among the top {args.top_k} at temperature {sampling:g} (--top-k without --temperature)",
            file=sys.stderr,
        )
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def show(token: int) -> None:
        text = decoder.decode(bytes([token])) if as_bytes else f"{token} "
        sys.stdout.write(text)
        sys.stdout.flush()

    if not args.json:
        show_prompt = decoder.decode(bytes(ids)) if as_bytes else " ".join(map(str, ids)) + " | "
        sys.stdout.write(show_prompt)
    # On a terminal the streamed tokens are the progress; with stdout piped, a bar on stderr counts them.
    progress = Progress(shown(json_output=args.json) and not sys.stdout.isatty())
    with progress.bar(args.max_new_tokens, "generating", unit="token") as bar:

        def on_token(token: int) -> None:
            show(token)
            bar.update()

        result = generate(
            session,
            ids,
            args.max_new_tokens,
            temperature=sampling,
            top_k=args.top_k,
            seed=args.seed,
            eos_id=args.eos_id,
            on_token=None if args.json else on_token,
        )
    if args.json:
        out = {
            "prompt_ids": result.prompt_ids,
            "tokens": result.tokens,
            "stopped": result.stopped,
            "prefill_seconds": result.prefill_seconds,
            "decode_seconds": result.decode_seconds,
            "tokens_per_s": result.tokens_per_s,
        }
        if as_bytes:
            out["text"] = bytes(result.tokens).decode("utf-8", errors="replace")
        print(json.dumps(out))
    else:
        sys.stdout.write(decoder.decode(b"", final=True) + "\n")
    print(
        f"generated {len(result.tokens)} tokens ({result.stopped}): prefill of {len(ids)} tokens in "
        f"{result.prefill_seconds * 1e3:.1f} ms, {result.tokens_per_s:.1f} tokens/s",
        file=sys.stderr,
    )
    return 0
