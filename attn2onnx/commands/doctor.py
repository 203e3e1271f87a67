"""Report what this machine can run: native ORT kernels, GPU (CUDA, Triton), TensorRT.

  attn2onnx doctor
  attn2onnx doctor --json

Exit 0 always (it reports; missing optional parts are not errors)."""
from __future__ import annotations

import argparse

HELP = "report which native kernels, GPU and TensorRT are available"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _native() -> tuple[bool, str]:
    from ..runtime import native

    reason = native.unavailable_reason()
    return (True, str(native.library_path())) if reason is None else (False, reason.splitlines()[0])


def _gpu() -> tuple[bool, str]:
    import torch

    if torch.cuda.is_available():
        return True, torch.cuda.get_device_name(0)
    return False, "no CUDA device (torch.cuda.is_available() is False)"


def _triton() -> tuple[bool, str]:
    try:
        import triton
    except ImportError:
        return False, "triton is not installed (pip install 'attn2onnx[gpu]')"
    return True, f"triton {triton.__version__} (kernels need a GPU, or TRITON_INTERPRET=1 on the CPU)"


def _tensorrt() -> tuple[bool, str]:
    from ..runtime import tensorrt

    if tensorrt.available():
        import tensorrt as trt

        return True, f"tensorrt {trt.__version__}"
    return False, "tensorrt is not installed (pip install 'attn2onnx[tensorrt]' on a machine with a GPU)"


def _onnxruntime() -> tuple[bool, str]:
    import onnxruntime

    return True, f"onnxruntime {onnxruntime.__version__}, providers: {', '.join(onnxruntime.get_available_providers())}"


def run(args: argparse.Namespace) -> int:
    import json

    checks = {"onnxruntime": _onnxruntime(), "native_kernels": _native(), "cuda": _gpu(), "triton": _triton(),
              "tensorrt": _tensorrt()}
    if args.json:
        print(json.dumps({name: {"available": ok, "detail": detail} for name, (ok, detail) in checks.items()}))
    else:
        for name, (ok, detail) in checks.items():
            print(f"{name:15s} {'yes' if ok else 'no ':3s}  {detail}")
    return 0
