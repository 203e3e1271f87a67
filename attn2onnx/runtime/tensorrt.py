"""TensorRT engines for attn2onnx models: build (strongly typed, our plugins registered) and run.

TensorRT is optional and imported lazily. Where it is missing every entry point raises
:class:`TensorRTUnavailable` -- a :class:`~attn2onnx.errors.UsageError`, so the CLI prints one
line and exits 2. :func:`available` says whether it is there without raising.

Python API::

    build_engine("model.onnx", "model.engine", shapes)      # shapes: input -> (min, opt, max)
    with TrtSession("model.engine") as sess:
        outputs = sess.run({"x": x, "key_padding_mask": mask})

Build the ONNX with the ``trt`` target of ``passes`` first: it tags every ``ai.attn2onnx`` node
that has a TensorRT plugin with ``plugin_namespace`` (others import as their function body).
Engines built with the AOT plugins embed the kernels' PTX and run without Python or Triton.

``configure_build(parser)`` / ``run_build(args)`` are the argument plumbing for an engine-build
command (``--shape NAME=MIN[,OPT,MAX]`` or ``--dim SYMBOL=MIN[,OPT,MAX]``).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import pkgutil
from typing import Any, Iterable, Mapping, Sequence

from ..errors import UsageError

Shape = tuple  # tuple[int, ...]
ShapeRange = tuple  # (min, opt, max) shapes

INSTALL_HINT = "pip install 'tensorrt>=10.8' on a machine with an NVIDIA GPU and driver"


class TensorRTUnavailable(UsageError):
    """TensorRT (or a GPU for it) is not available here."""


def available() -> bool:
    """True when the tensorrt package imports."""
    try:
        _trt()
    except TensorRTUnavailable:
        return False
    return True


def _trt() -> Any:
    try:
        return importlib.import_module("tensorrt")
    except Exception as err:  # noqa: BLE001 - ImportError, or a broken install raising OSError
        raise TensorRTUnavailable(f"TensorRT is not installed ({err.__class__.__name__}: {err}); {INSTALL_HINT}") from err


def plugin_modules() -> list[str]:
    """Module names of every op's TensorRT plugin (``custom_ops/<op>/trt_plugin.py``)."""
    from .. import custom_ops

    found = []
    for info in pkgutil.iter_modules(custom_ops.__path__):
        if not info.ispkg:
            continue
        name = f"{custom_ops.__name__}.{info.name}.trt_plugin"
        try:
            if importlib.util.find_spec(name) is not None:
                found.append(name)
        except ImportError:
            continue
    return sorted(found)


def plugin_ops() -> dict[str, str]:
    """ONNX op type -> TensorRT plugin namespace, for every op that has a plugin. Needs neither
    TensorRT nor Triton (the plugin modules import both lazily)."""
    ops = {}
    for name in plugin_modules():
        module = importlib.import_module(name)
        ops[module.ONNX_OP] = module.PLUGIN_NAMESPACE
    return ops


def register_plugins() -> list[str]:
    """Register every op's plugin with TensorRT; returns the plugin ids."""
    _trt()
    ids = []
    for name in plugin_modules():
        try:
            ids.append(importlib.import_module(name).register())
        except ImportError as err:
            raise TensorRTUnavailable(f"cannot register the TensorRT plugins ({err}); {INSTALL_HINT}") from err
    return ids


def _logger(trt: Any, verbose: bool = False) -> Any:
    return trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)


def normalize_shapes(shapes: Mapping[str, Any]) -> dict[str, ShapeRange]:
    """``{name: shape}`` or ``{name: (min, opt, max)}`` -> ``{name: (min, opt, max)}`` of int tuples."""
    out = {}
    for name, value in shapes.items():
        value = tuple(value)
        if value and all(isinstance(v, (tuple, list)) for v in value):
            if len(value) != 3:
                raise UsageError(f"shape range of {name} must be (min, opt, max), got {len(value)} shapes")
            lo, opt, hi = (tuple(int(d) for d in s) for s in value)
        else:
            lo = opt = hi = tuple(int(d) for d in value)
        if not (len(lo) == len(opt) == len(hi)) or any(a > b or b > c for a, b, c in zip(lo, opt, hi)):
            raise UsageError(f"shape range of {name} must satisfy min <= opt <= max per dim: {lo}, {opt}, {hi}")
        out[name] = (lo, opt, hi)
    return out


def shapes_from_dims(onnx_path: str | os.PathLike, dims: Mapping[str, Any]) -> dict[str, ShapeRange]:
    """Shape ranges of every graph input from ranges of its symbolic dims (``dim_param``).

    ``dims`` maps a symbol to an int or (min, opt, max); fixed dims stay as they are.
    """
    import onnx

    model = onnx.load(os.fspath(onnx_path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    ranges = {k: ((v, v, v) if isinstance(v, int) else tuple(int(x) for x in v)) for k, v in dims.items()}
    shapes = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        lo, opt, hi = [], [], []
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_value"):
                for part in (lo, opt, hi):
                    part.append(dim.dim_value)
            else:
                symbol = dim.dim_param or f"{value.name}:{axis}"
                if symbol not in ranges:
                    raise UsageError(f"input {value.name} dim {axis} ({symbol!r}) is dynamic: give its range "
                                     f"with --dim {symbol}=MIN,OPT,MAX")
                for part, v in zip((lo, opt, hi), ranges[symbol]):
                    part.append(v)
        shapes[value.name] = (tuple(lo), tuple(opt), tuple(hi))
    return shapes


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, shapes: Mapping[str, Any],
                 *, workspace_gb: float | None = None, verbose: bool = False, plugins: bool = True) -> str:
    """Parse ``onnx_path`` with the plugins registered, build a strongly typed engine with one
    optimization profile from ``shapes`` (input -> shape or (min, opt, max)), write it to
    ``engine_path`` and return that path."""
    trt = _trt()
    if plugins:
        register_plugins()
    onnx_path, engine_path = os.fspath(onnx_path), os.fspath(engine_path)
    if not os.path.isfile(onnx_path):
        raise UsageError(f"no ONNX model at {onnx_path}")
    logger = _logger(trt, verbose)
    trt.init_libnvinfer_plugins(logger, "")
    builder = trt.Builder(logger)
    flags = 0
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly_typed is not None:  # TensorRT 11 networks are always strongly typed
        flags |= 1 << int(strongly_typed)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UsageError(f"TensorRT cannot parse {onnx_path}: {errors}")
    ranges = normalize_shapes(shapes)
    config = builder.create_builder_config()
    if workspace_gb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dynamic = any(d < 0 for d in tensor.shape)
        if tensor.name in ranges:
            profile.set_shape(tensor.name, *ranges[tensor.name])
        elif dynamic:
            raise UsageError(f"input {tensor.name} has dynamic shape {tuple(tensor.shape)}: give its range")
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (run with verbose=True)")
    folder = os.path.dirname(os.path.abspath(engine_path))
    os.makedirs(folder, exist_ok=True)
    tmp = engine_path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(memoryview(serialized))
    os.replace(tmp, engine_path)
    return engine_path


def engine_for_shapes(onnx_path: str | os.PathLike, batch_seq: Sequence[tuple[int, int]]) -> str:
    """Build (into a fresh temporary folder) an engine whose one profile covers every
    (batch, seq) in ``batch_seq``: what ``run`` / ``validate --backends trt`` need."""
    import tempfile

    batches, seqs = [b for b, _ in batch_seq], [t for _, t in batch_seq]
    dims = {"batch": (min(batches), max(batches), max(batches)), "seq": (min(seqs), max(seqs), max(seqs))}
    engine_path = os.path.join(tempfile.mkdtemp(prefix="attn2onnx-trt-"), "model.engine")
    return build_engine(onnx_path, engine_path, shapes_from_dims(onnx_path, dims))


class TrtSession:
    """Runs a serialized engine on CUDA through torch tensors (inputs: numpy arrays or tensors)."""

    def __init__(self, engine_path: str | os.PathLike, *, verbose: bool = False):
        trt = _trt()
        import torch

        if not torch.cuda.is_available():
            raise TensorRTUnavailable("running a TensorRT engine needs a CUDA GPU; none is visible")
        self._trt, self._torch = trt, torch
        self._logger = _logger(trt, verbose)
        self._runtime = trt.Runtime(self._logger)
        with open(os.fspath(engine_path), "rb") as f:
            self.engine = self._runtime.deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise UsageError(f"{engine_path} is not a TensorRT engine for this TensorRT version / GPU")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        self.stream = torch.cuda.Stream()

    def _torch_dtype(self, trt_dtype: Any) -> Any:
        trt, torch = self._trt, self._torch
        table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                 trt.int32: torch.int32, trt.int64: torch.int64, trt.bool: torch.bool, trt.int8: torch.int8}
        return table[trt_dtype]

    def run(self, feeds: Mapping[str, Any], *, as_numpy: bool = True) -> dict[str, Any]:
        """Run once; returns output name -> numpy array (bf16 as float32), or CUDA tensors."""
        torch = self._torch
        missing = set(self.input_names) - set(feeds)
        if missing:
            raise UsageError(f"missing engine inputs: {sorted(missing)}")
        keep = []
        for name in self.input_names:
            want = self._torch_dtype(self.engine.get_tensor_dtype(name))
            t = torch.as_tensor(feeds[name]).to(device="cuda", dtype=want).contiguous()
            keep.append(t)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outputs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            t = torch.empty(shape, dtype=self._torch_dtype(self.engine.get_tensor_dtype(name)), device="cuda")
            outputs[name] = t
            self.context.set_tensor_address(name, t.data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        self.stream.synchronize()
        if not as_numpy:
            return outputs
        return {n: (t.float() if t.dtype == torch.bfloat16 else t).cpu().numpy() for n, t in outputs.items()}

    def __enter__(self) -> "TrtSession":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.context = None
        self.engine = None


# ------------------------------------------------------------------------------------------
# command plumbing: `attn2onnx engine MODEL.onnx ENGINE --dim batch=1,2,8 --dim seq=1,128,2048`
# ------------------------------------------------------------------------------------------

def parse_range(text: str) -> tuple:
    """``"1,128,2048"`` -> (1, 128, 2048); ``"64"`` -> (64, 64, 64)."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"bad range {text!r}: expected MIN[,OPT,MAX] integers") from None
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or not values[0] <= values[1] <= values[2]:
        raise UsageError(f"bad range {text!r}: expected MIN,OPT,MAX with MIN <= OPT <= MAX")
    return values


def parse_shape(text: str) -> tuple:
    """``"q=1x16x32x80,4x512x32x80,8x2048x32x80"`` -> ("q", (min, opt, max))."""
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


def _key_value(text: str) -> tuple:
    name, sep, spec = text.partition("=")
    if not sep or not name:
        raise UsageError(f"bad --dim {text!r}: expected SYMBOL=MIN[,OPT,MAX]")
    return name, parse_range(spec)


def configure_build(parser: argparse.ArgumentParser) -> None:
    """Arguments of an engine-build command."""
    parser.add_argument("onnx", help="ONNX model (optimized for the trt target)")
    parser.add_argument("engine", help="where to write the serialized engine")
    parser.add_argument("--dim", action="append", default=[], metavar="SYMBOL=MIN[,OPT,MAX]",
                        help="range of a symbolic input dim, e.g. --dim batch=1,2,8 --dim seq=1,256,4096")
    parser.add_argument("--shape", action="append", default=[], metavar="NAME=MIN[,OPT,MAX]",
                        help="shape range of one input, dims joined by x (overrides --dim for that input)")
    parser.add_argument("--workspace-gb", type=float, default=None, help="builder workspace limit in GiB")
    parser.add_argument("--verbose", action="store_true", help="TensorRT's verbose log")


def run_build(args: argparse.Namespace) -> int:
    """Build the engine described by ``args`` (see :func:`configure_build`)."""
    _trt()  # fail early, with exit 2 through UsageError, when TensorRT is missing
    shapes: dict = {}
    if args.dim or not args.shape:
        shapes.update(shapes_from_dims(args.onnx, dict(_key_value(d) for d in args.dim)))
    shapes.update(dict(parse_shape(s) for s in args.shape))
    path = build_engine(args.onnx, args.engine, shapes, workspace_gb=args.workspace_gb, verbose=args.verbose)
    print(f"wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m attn2onnx.runtime.tensorrt MODEL.onnx ENGINE [--dim ...]``."""
    parser = argparse.ArgumentParser(prog="python -m attn2onnx.runtime.tensorrt", description=__doc__.split("\n")[0])
    configure_build(parser)
    args = parser.parse_args(argv)
    try:
        return run_build(args)
    except UsageError as err:
        print(f"attn2onnx: error: {err}", file=__import__("sys").stderr)
        return 2


__all__: Iterable[str] = [
    "TensorRTUnavailable", "TrtSession", "available", "build_engine", "configure_build", "normalize_shapes",
    "parse_range", "parse_shape", "plugin_modules", "plugin_ops", "register_plugins", "run_build",
    "shapes_from_dims",
]

if __name__ == "__main__":
    raise SystemExit(main())
