"""Build a strongly typed TensorRT engine from an exported model, plugins registered.

  attn2onnx optimize model.onnx -o model.trt.onnx --target trt     tag nodes for the plugins
  attn2onnx build-engine model.trt.onnx -o model.engine --shapes 1x1/2x256/8x4096
  attn2onnx build-engine model.trt.onnx -o model.engine --dim batch=1,2,8 --dim seq=1,256,4096

--shapes gives the profile's min/opt/max as BATCHxSEQ; --dim gives any symbolic dim's range.
Needs TensorRT (pip install 'attn2onnx[tensorrt]'); without it: one line, exit 2."""
from __future__ import annotations

import argparse

from . import positive_float

HELP = "build a TensorRT engine (strongly typed, attn2onnx plugins)"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL.onnx")
    parser.add_argument("-o", "--output", required=True, metavar="MODEL.engine")
    parser.add_argument("--shapes", metavar="MIN/OPT/MAX", help="profile as BATCHxSEQ triples, e.g. 1x1/2x256/8x4096")
    parser.add_argument("--dim", action="append", default=[], metavar="SYMBOL=MIN,OPT,MAX",
                        help="range of one symbolic dim, repeatable")
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


def run(args: argparse.Namespace) -> int:
    from ..onnx_io import load_onnx
    from ..runtime.tensorrt import _key_value, _trt, build_engine, shapes_from_dims

    load_onnx(args.model)  # one-line error for a missing / non-ONNX file
    dims = dims_from_shapes(args.shapes) if args.shapes else {}
    dims.update(dict(_key_value(d) for d in args.dim))
    _trt()  # one-line error, exit 2, where TensorRT is missing
    path = build_engine(args.model, args.output, shapes_from_dims(args.model, dims),
                        workspace_gb=args.workspace_gb, verbose=args.verbose)
    print(f"wrote {path}")
    return 0
