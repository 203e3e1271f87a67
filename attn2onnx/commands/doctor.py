"""Report what this machine can run: native ORT kernels, GPU (CUDA, Triton), TensorRT, and per
op of the registry which backends it has besides its function body and which of them run here.

  attn2onnx doctor
  attn2onnx doctor --json

Exit 0 always (it reports; missing optional parts are not errors). It imports no torch: the GPU
is asked of the CUDA driver, the op registry is torch-free."""

from __future__ import annotations

import argparse

HELP = "report which native kernels, GPU and TensorRT are available"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _native() -> tuple[bool, str]:
    from ..runtime import native

    reason = native.unavailable_reason()
    return (True, str(native.library_path())) if reason is None else (False, reason.splitlines()[0])


# Where the CUDA driver library is: Linux, then Windows (macOS has none).
CUDA_DRIVERS = ("libcuda.so.1", "libcuda.so", "nvcuda.dll")


def _gpu() -> tuple[bool, str]:
    """The first CUDA device, asked of the CUDA driver API (libcuda) through ctypes: what
    ``torch.cuda.is_available()`` asks too, without the seconds of importing torch."""
    import ctypes

    for library in CUDA_DRIVERS:
        try:
            cuda = ctypes.CDLL(library)
            break
        except OSError:
            continue
    else:
        return False, "no CUDA device (no CUDA driver: libcuda not found)"
    count, device, name = ctypes.c_int(0), ctypes.c_int(0), ctypes.create_string_buffer(256)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
        return False, "no CUDA device (the CUDA driver finds none)"
    if cuda.cuDeviceGet(ctypes.byref(device), 0) != 0 or cuda.cuDeviceGetName(name, len(name), device) != 0:
        return True, f"{count.value} CUDA device(s)"
    return True, name.value.decode(errors="replace")


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


def _op_backends() -> dict[str, list[str]]:
    """Op type -> the kinds of backend it declares besides its function body ("native", ...)."""
    from ..custom_ops import REGISTRY

    return {name: opdef.backends.names() for name, opdef in sorted(REGISTRY.items())}


def _usable(checks: dict[str, tuple[bool, str]]) -> dict[str, bool]:
    """Backend kind -> whether it runs here: the native library builds; Triton kernels and
    TensorRT plugins need their package and a CUDA device."""
    cuda = checks["cuda"][0]
    return {
        "native": checks["native_kernels"][0],
        "triton": checks["triton"][0] and cuda,
        "tensorrt": checks["tensorrt"][0] and cuda,
    }


def run(args: argparse.Namespace) -> int:
    import json

    checks = {
        "onnxruntime": _onnxruntime(),
        "native_kernels": _native(),
        "cuda": _gpu(),
        "triton": _triton(),
        "tensorrt": _tensorrt(),
    }
    ops, usable = _op_backends(), _usable(checks)
    kind_check = {"native": "native_kernels", "triton": "triton", "tensorrt": "tensorrt"}
    if args.json:
        report = {name: {"available": ok, "detail": detail} for name, (ok, detail) in checks.items()}
        for kind, check in kind_check.items():  # which ops have this backend, and whether it runs here
            report[check].update(ops=[op for op, kinds in ops.items() if kind in kinds], usable=usable[kind])
        print(json.dumps(report))
        return 0
    for name, (ok, detail) in checks.items():
        print(f"{name:15s} {'yes' if ok else 'no ':3s}  {detail}")
    print("\nbackends per op besides the function body (usable here: yes / no)")
    for op, kinds in ops.items():
        listed = ", ".join(f"{kind} {'yes' if usable[kind] else 'no'}" for kind in kinds)
        print(f"  {op:21s} {listed or '-'}")
    return 0
