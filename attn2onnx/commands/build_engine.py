"""Build a strongly typed TensorRT engine from an exported model, plugins registered.

  attn2onnx optimize model.onnx -o model.trt.onnx --target trt     tag nodes for the plugins
  attn2onnx build-engine model.trt.onnx -o model.engine --shapes 1x1/2x256/8x4096
  attn2onnx build-engine model.trt.onnx -o model.engine --dim batch=1,2,8 --dim seq=1,256,4096
  attn2onnx build-engine model.trt.onnx -o model.engine --shape q=1x16x32x80,4x512x32x80,8x2048x32x80

--shapes gives the profile's min/opt/max as BATCHxSEQ; --dim gives any symbolic dim's range;
--shape gives one input's whole shape range (over what --shapes / --dim give it).
Needs TensorRT (pip install 'attn2onnx[tensorrt]'); without it: one line, exit 2."""

from __future__ import annotations

import argparse

from . import positive_float

HELP = "build a TensorRT engine (strongly typed, attn2onnx plugins)"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL.onnx")
    parser.add_argument("-o", "--output", required=True, metavar="MODEL.engine")
    parser.add_argument("--shapes", metavar="MIN/OPT/MAX", help="profile as BATCHxSEQ triples, e.g. 1x1/2x256/8x4096")
    parser.add_argument(
        "--dim", action="append", default=[], metavar="SYMBOL=MIN,OPT,MAX", help="range of one symbolic dim, repeatable"
    )
    parser.add_argument(
        "--shape",
        action="append",
        default=[],
        metavar="NAME=MIN[,OPT,MAX]",
        help="shape range of one input, dims joined by x, repeatable",
    )
    parser.add_argument("--workspace-gb", type=positive_float, help="builder workspace limit in GiB")
    parser.add_argument("--verbose", action="store_true", help="TensorRT's verbose log")


def dims_from_shapes(text: str) -> dict[str, tuple[int, int, int]]:
    """``"1x1/2x256/8x4096"`` -> {"batch": (1, 2, 8), "seq": (1, 256, 4096)}."""
    from ..errors import UsageError
    from ..validate import parse_shapes

    parts = text.split("/")
    if len(parts) != 3:
        raise UsageError(f"--shapes {text!r}: expected MIN/OPT/MAX, each BATCHxSEQ")
    (b0, t0), (b1, t1), (b2, t2) = (parse_shapes(p)[0] for p in parts)
    if not (b0 <= b1 <= b2 and t0 <= t1 <= t2):
        raise UsageError(f"--shapes {text!r}: need min <= opt <= max in both dims")
    return {"batch": (b0, b1, b2), "seq": (t0, t1, t2)}


def parse_range(text: str) -> tuple[int, int, int]:
    """``"1,128,2048"`` -> (1, 128, 2048); ``"64"`` -> (64, 64, 64)."""
    from ..errors import UsageError

    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"bad range {text!r}: expected MIN[,OPT,MAX] integers") from None
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or not values[0] <= values[1] <= values[2]:
        raise UsageError(f"bad range {text!r}: expected MIN,OPT,MAX with MIN <= OPT <= MAX")
    return values


def parse_dim(text: str) -> tuple[str, tuple[int, int, int]]:
    """``--dim`` ``"seq=1,128,2048"`` -> ("seq", (1, 128, 2048))."""
    from ..errors import UsageError

    name, sep, spec = text.partition("=")
    if not sep or not name:
        raise UsageError(f"bad --dim {text!r}: expected SYMBOL=MIN[,OPT,MAX]")
    return name, parse_range(spec)


def parse_shape(text: str) -> tuple[str, tuple]:
    """``--shape`` ``"q=1x16x32x80,4x512x32x80,8x2048x32x80"`` -> ("q", (min, opt, max))."""
    from ..errors import UsageError
    from ..runtime.tensorrt import normalize_shapes

    name, sep, spec = text.partition("=")
    if not sep or not name:
        raise UsageError(f"bad --shape {text!r}: expected NAME=DIMS[,DIMS,DIMS] with DIMS like 1x16x32x80")
    try:
        parts = [tuple(int(d) for d in p.split("x")) for p in spec.split(",")]
    except ValueError:
        raise UsageError(f"bad --shape {text!r}: dims must be integers joined by 'x'") from None
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3:
        raise UsageError(f"bad --shape {text!r}: give one shape or MIN,OPT,MAX")
    return name, normalize_shapes({name: parts})[name]


def run(args: argparse.Namespace) -> int:
    from ..custom_ops import check_model
    from ..onnx_io import load_onnx
    from ..runtime.tensorrt import build_engine, require_tensorrt, shapes_from_dims

    check_model(load_onnx(args.model))  # one-line errors: a missing / non-ONNX file, a malformed ai.attn2onnx node
    dims = dims_from_shapes(args.shapes) if args.shapes else {}
    dims.update(dict(parse_dim(d) for d in args.dim))
    given = dict(parse_shape(s) for s in args.shape)
    require_tensorrt()  # one-line error, exit 2, where TensorRT is missing
    shapes = shapes_from_dims(args.model, dims) if dims or not given else {}
    shapes.update(given)
    path = build_engine(args.model, args.output, shapes, workspace_gb=args.workspace_gb, verbose=args.verbose)
    print(f"wrote {path}")
    return 0
