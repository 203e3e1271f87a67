"""Create a randomly initialised model and save it as an attn2onnx checkpoint.

  attn2onnx new mha -o lm.pt                                  causal LM (the default family
                                                               for variants that can be causal)
  attn2onnx new imhsa -o enc.pt --family encoder --image-size 32 --patch-size 4
  attn2onnx new dcmha -o dc.pt --option rope=true --option window=16
  attn2onnx new reuse -o r.pt --layers 4 --reuse-schedule 0,4,4,0

Variant options (--option KEY=VALUE, repeatable) take Python / JSON literals: true, 3, 0.5,
"text", [1,2] or 1,2 for a list; anything else is a string."""

from __future__ import annotations

import argparse
import ast
import json
from typing import Any

from ..errors import UsageError
from . import positive_int, seed_int

HELP = "create a randomly initialised model checkpoint"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("variant", metavar="VARIANT", help="attention variant (see 'attn2onnx variants')")
    parser.add_argument("-o", "--output", required=True, metavar="PATH", help="checkpoint to write (.pt)")
    parser.add_argument(
        "--family",
        choices=("lm", "encoder", "layer"),
        help="model family (default: lm if the variant can be causal, else encoder)",
    )
    parser.add_argument("--layers", type=positive_int, help="number of blocks (default 2; layer: 1)")
    parser.add_argument("--d-model", type=positive_int, default=64, help="model width (default 64)")
    parser.add_argument("--heads", type=positive_int, default=4, help="attention heads (default 4)")
    parser.add_argument(
        "--max-len", type=positive_int, default=256, help="longest sequence, CLS included (default 256)"
    )
    parser.add_argument("--seed", type=seed_int, default=0, help="initialisation seed, 0 .. 2**64 - 1 (default 0)")
    parser.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="variant option, repeatable (e.g. rope=true)"
    )
    parser.add_argument(
        "--vocab-size", type=positive_int, default=256, help="token vocabulary (lm, token encoder; default 256)"
    )
    parser.add_argument("--num-classes", type=positive_int, default=10, help="encoder classes (default 10)")
    parser.add_argument(
        "--image-size", type=positive_int, help="encoder: square image side; with --patch-size makes an image encoder"
    )
    parser.add_argument("--patch-size", type=positive_int, help="encoder: patch side")
    parser.add_argument("--channels", type=positive_int, default=3, help="encoder: image channels (default 3)")
    parser.add_argument("--mlp", choices=("swiglu", "gelu"), help="MLP kind (default: swiglu for lm, gelu for encoder)")
    parser.add_argument("--mlp-hidden", type=positive_int, help="MLP width")
    parser.add_argument("--untied", action="store_true", help="lm: own output head instead of the tied embedding")
    parser.add_argument("--reuse-schedule", metavar="P0,P1,...", help="reuse: reused heads per layer")


def parse_value(text: str) -> Any:
    """A variant option's value from the command line: bools, None, numbers, lists, or text."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            pass
    return text


def parse_options(items: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UsageError(f"--option takes KEY=VALUE, got {item!r}")
        if key in options:
            raise UsageError(f"--option {key} given twice")
        options[key] = parse_value(value)
    return options


def parse_schedule(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.replace(" ", "").strip("[]").split(",") if part]
    except ValueError:
        raise UsageError(f"--reuse-schedule takes comma-separated integers, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    from ..fileio import check_destination
    from ..variants import check_name

    check_name(args.variant)  # an unknown name or output folder in one line, before torch is imported
    check_destination(args.output)
    from ..checkpoint import save
    from ..models import ModelConfig, build_model
    from ..variants import get_variant

    info = get_variant(args.variant)
    family = args.family or ("lm" if info.causal and "lm" in info.families else "encoder")
    config = ModelConfig(
        family=family,
        variant=args.variant,
        options=parse_options(args.option),
        layers=args.layers,
        d_model=args.d_model,
        heads=args.heads,
        max_len=args.max_len,
        vocab_size=args.vocab_size,
        num_classes=args.num_classes,
        patch_size=args.patch_size,
        image_size=args.image_size,
        channels=args.channels,
        mlp=args.mlp,
        mlp_hidden=args.mlp_hidden,
        tie_embeddings=not args.untied,
        reuse_schedule=parse_schedule(args.reuse_schedule),
        seed=args.seed,
    )
    model = build_model(config)
    path = save(model, args.output)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"wrote {path}: {type(model).__name__} ({config.family}), variant {config.variant}, "
        f"{config.layers} layer{'s' if config.layers != 1 else ''}, d_model {config.d_model}, "
        f"{config.heads} heads, max_len {config.max_len}, {params:,} parameters"
    )
    return 0
