"""Quantize an exported graph's MatMul weights to int4 or int8 with ONNX Runtime's MatMulNBits.

  attn2onnx quantize model.onnx -o model.int4.onnx --weights int4                block 32, symmetric
  attn2onnx quantize lm.decode.onnx -o lm.decode.int8.onnx --weights int8         a decode graph
  attn2onnx quantize model.opt.onnx -o model.int4.onnx --weights int4 --block-size 64 --asymmetric
  attn2onnx quantize lm.decode.onnx -o lm.decode.int4.onnx --weights int4 --accuracy-level 4   int8 compute

Weight-only: every MatMul with a constant weight becomes com.microsoft MatMulNBits (one fp32
scale per --block-size weights along K, a zero point too with --asymmetric); the ai.attn2onnx
nodes, their function bodies and the metadata stay as they were, so a decode graph still runs in
'attn2onnx generate', and prefill, decode and optimised (optimize --target ort) graphs all
quantize. Weights in external data (a billion-parameter export) are quantized one at a time and
streamed to the output's. The mode is recorded in the metadata (attn2onnx.quantized, e.g. int4/block32) and
'attn2onnx validate' judges the graph by that mode's tolerance (docs/architecture.md "Quantized graphs")."""

from __future__ import annotations

import argparse

HELP = "quantize an ONNX model's MatMul weights to int4 / int8 (ONNX Runtime MatMulNBits)"


def configure(parser: argparse.ArgumentParser) -> None:
    from ..quantize import ACCURACY_LEVELS, BLOCK_SIZES, DEFAULT_BLOCK_SIZE

    parser.add_argument("model", metavar="IN.onnx")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.onnx")
    parser.add_argument("--weights", required=True, choices=("int4", "int8"), help="bits per weight")
    parser.add_argument(
        "--block-size",
        type=int,
        choices=BLOCK_SIZES,
        default=DEFAULT_BLOCK_SIZE,
        help=f"weights per scale along K (default {DEFAULT_BLOCK_SIZE})",
    )
    parser.add_argument("--asymmetric", action="store_true", help="a zero point per block as well as a scale")
    parser.add_argument(
        "--accuracy-level",
        type=int,
        choices=ACCURACY_LEVELS,
        help="MatMulNBits' compute: 4 quantizes activations to int8 per block (the fast CPU kernel; "
        "default for int8), 0 computes in fp32 (default for int4)",
    )


def run(args: argparse.Namespace) -> int:
    from ..fileio import check_destination, regular_file

    regular_file(args.model)  # a missing model or output folder in one line, before onnx loads
    check_destination(args.output)
    from ..quantize import quant_mode, quantize_file

    result = quantize_file(
        args.model, args.output, quant_mode(args.weights, args.block_size, args.asymmetric, args.accuracy_level)
    )
    print(
        f"wrote {args.output}: {result.matmuls} MatMul weights as {result.mode}, "
        f"{result.bytes_before / 2**20:.1f} MiB -> {result.bytes_after / 2**20:.1f} MiB"
    )
    return 0
