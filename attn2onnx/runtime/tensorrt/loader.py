"""Building TensorRT engines, as loaders in the manner of Polygraphy's ``backend/trt/loader.py``.

Each loader is a small callable object: built with its arguments, called to do the work, and
chained by passing one loader to the next, so nothing runs (or imports TensorRT) until the
last one is called::

    SaveEngine(EngineBytesFromNetwork(NetworkFromOnnxPath("m.onnx"), shapes), "m.engine")()

:func:`build_engine` is that chain; :func:`engine_for_shapes` builds into a temporary folder an
engine whose profile covers a list of (batch, seq) shapes. TensorRT is imported lazily by
:func:`require_tensorrt`, which raises :class:`TensorRTUnavailable` (a UsageError) where it is
missing.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Callable, Mapping, Sequence

from ...errors import UsageError

Shape = tuple  # tuple[int, ...]
ShapeRange = tuple  # (min, opt, max) shapes

INSTALL_HINT = "pip install 'tensorrt>=10.8' on a machine with an NVIDIA GPU and driver"


class TensorRTUnavailable(UsageError):
    """TensorRT (or a GPU for it) is not available here."""


def require_tensorrt() -> Any:
    """The ``tensorrt`` module, or :class:`TensorRTUnavailable` where it does not import."""
    try:
        return importlib.import_module("tensorrt")
    except Exception as err:  # noqa: BLE001 - ImportError, or a broken install raising OSError
        reason = f"{err.__class__.__name__}: {err}"
        raise TensorRTUnavailable(f"TensorRT is not installed ({reason}); {INSTALL_HINT}") from err


def available() -> bool:
    """True when the tensorrt package imports."""
    try:
        require_tensorrt()
    except TensorRTUnavailable:
        return False
    return True


def make_logger(trt: Any, verbose: bool = False) -> Any:
    """A TensorRT logger: warnings, or everything with ``verbose``."""
    return trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)


def plugin_modules() -> list[str]:
    """Module names of every op's TensorRT plugin, as the op registry declares them
    (``OpDef.backends.trt_plugin_module``)."""
    from ...custom_ops import REGISTRY

    return sorted(op.backends.trt_plugin_module for op in REGISTRY.values() if op.backends.trt_plugin_module)


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
    require_tensorrt()
    ids = []
    for name in plugin_modules():
        try:
            ids.append(importlib.import_module(name).register())
        except ImportError as err:
            raise TensorRTUnavailable(f"cannot register the TensorRT plugins ({err}); {INSTALL_HINT}") from err
    return ids


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
                    raise UsageError(
                        f"input {value.name} dim {axis} ({symbol!r}) is dynamic: give its range "
                        f"with --dim {symbol}=MIN,OPT,MAX"
                    )
                for part, v in zip((lo, opt, hi), ranges[symbol]):
                    part.append(v)
        shapes[value.name] = (tuple(lo), tuple(opt), tuple(hi))
    return shapes


class NetworkFromOnnxPath:
    """Loader: a strongly typed network parsed from an ONNX file, our plugins registered.
    Calling it returns ``(builder, network, parser)`` (the parser owns the parsed weights)."""

    def __init__(self, onnx_path: str | os.PathLike, *, plugins: bool = True, verbose: bool = False) -> None:
        self.onnx_path, self.plugins, self.verbose = os.fspath(onnx_path), plugins, verbose

    def __call__(self) -> tuple[Any, Any, Any]:
        trt = require_tensorrt()
        if self.plugins:
            register_plugins()
        from attn2onnx.custom_ops import check_model
        from attn2onnx.onnx_io import load_onnx

        check_model(load_onnx(self.onnx_path))  # the file (external data included) and every ai.attn2onnx node
        logger = make_logger(trt, self.verbose)
        trt.init_libnvinfer_plugins(logger, "")
        builder = trt.Builder(logger)
        flags = 0
        strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        if strongly_typed is not None:  # TensorRT 11 networks are always strongly typed
            flags |= 1 << int(strongly_typed)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(self.onnx_path):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise UsageError(f"TensorRT cannot parse {self.onnx_path}: {errors}")
        return builder, network, parser


class EngineBytesFromNetwork:
    """Loader: the serialized engine of a network (from a :class:`NetworkFromOnnxPath`-like
    loader) with one optimization profile from ``shapes`` (input -> shape or (min, opt, max))."""

    def __init__(
        self,
        network: Callable[[], tuple[Any, Any, Any]],
        shapes: Mapping[str, Any],
        *,
        workspace_gb: float | None = None,
    ) -> None:
        self.network, self.ranges, self.workspace_gb = network, normalize_shapes(shapes), workspace_gb

    def __call__(self) -> Any:
        trt = require_tensorrt()
        builder, network, _parser = self.network()
        config = builder.create_builder_config()
        if self.workspace_gb:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(self.workspace_gb * 2**30))
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            if tensor.name in self.ranges:
                profile.set_shape(tensor.name, *self.ranges[tensor.name])
            elif any(d < 0 for d in tensor.shape):
                raise UsageError(f"input {tensor.name} has dynamic shape {tuple(tensor.shape)}: give its range")
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise RuntimeError("TensorRT failed to build an engine (build with verbose=True for its log)")
        return serialized


class SaveEngine:
    """Loader: writes the bytes of an engine loader to ``path`` atomically; returns the path."""

    def __init__(self, engine_bytes: Callable[[], Any], path: str | os.PathLike) -> None:
        self.engine_bytes, self.path = engine_bytes, os.fspath(path)

    def __call__(self) -> str:
        from ...fileio import atomic_output

        serialized = self.engine_bytes()
        with atomic_output(self.path) as tmp:
            tmp.write_bytes(memoryview(serialized))
        return self.path


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    shapes: Mapping[str, Any],
    *,
    workspace_gb: float | None = None,
    verbose: bool = False,
    plugins: bool = True,
) -> str:
    """Parse ``onnx_path`` with the plugins registered, build a strongly typed engine with one
    optimization profile from ``shapes`` (input -> shape or (min, opt, max)), write it to
    ``engine_path`` and return that path."""
    require_tensorrt()  # before anything else: the clean error where TensorRT is missing
    network = NetworkFromOnnxPath(onnx_path, plugins=plugins, verbose=verbose)
    return SaveEngine(EngineBytesFromNetwork(network, shapes, workspace_gb=workspace_gb), engine_path)()


def engine_for_shapes(onnx_path: str | os.PathLike, batch_seq: Sequence[tuple[int, int]]) -> str:
    """Build (into a fresh temporary folder) an engine whose one profile covers every
    (batch, seq) in ``batch_seq``: what ``run`` / ``validate --backends trt`` need."""
    import tempfile

    batches, seqs = [b for b, _ in batch_seq], [t for _, t in batch_seq]
    dims = {"batch": (min(batches), max(batches), max(batches)), "seq": (min(seqs), max(seqs), max(seqs))}
    engine_path = os.path.join(tempfile.mkdtemp(prefix="attn2onnx-trt-"), "model.engine")
    return build_engine(onnx_path, engine_path, shapes_from_dims(onnx_path, dims))


__all__ = [
    "EngineBytesFromNetwork",
    "NetworkFromOnnxPath",
    "SaveEngine",
    "TensorRTUnavailable",
    "available",
    "build_engine",
    "engine_for_shapes",
    "make_logger",
    "normalize_shapes",
    "plugin_modules",
    "plugin_ops",
    "register_plugins",
    "require_tensorrt",
    "shapes_from_dims",
]
