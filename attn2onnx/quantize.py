"""Weight-only quantization of an exported graph with ONNX Runtime's own quantizer.

Every MatMul whose weight is a constant 2-D initializer becomes a ``com.microsoft`` MatMulNBits
node (:class:`onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer`): the
weight is cut along K into blocks of ``block_size`` values, each block stored as 4- or 8-bit
integers with one fp32 scale (symmetric by default; asymmetric adds a zero point). Activations
stay fp32 for int4 (true weight-only: the CPU kernel dequantizes blocks on the fly); int8 runs
with ``accuracy_level`` 4, as MatMulNBits' 8-bit CPU kernel needs to be fast (it quantizes each
activation block to int8 for the dot products; without it a D=512 decode step was ~6x slower
than fp32).
Int8 is MatMulNBits and not ORT's ``quantize_dynamic`` (MatMulInteger): on a D=512 decode step
both ran at the same speed, MatMulNBits with about half the error (block scales instead of one
scale per tensor) and one quantizer for both modes (benchmarks/RESULTS.md "Quantize").

Everything else is left as exported: the ai.attn2onnx nodes, their ONNX function bodies, the
opset imports (com.microsoft is added) and the metadata (``attn2onnx.decode`` keeps a decode
graph runnable by ``attn2onnx generate``); :func:`quantize_model` checks that. The mode is
recorded as ``attn2onnx.quantized`` (e.g. ``int4/block32``) so that ``validate`` judges the
graph by that mode's tolerance (:func:`attn2onnx.tolerances.quantized_tolerance`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Iterator

from .errors import UsageError

if TYPE_CHECKING:  # onnx loads in the functions: `attn2onnx --help` builds this command's parser
    import onnx

QUANTIZED_KEY = "attn2onnx.quantized"
BITS = {"int4": 4, "int8": 8}
# MatMulNBits takes power-of-two blocks from 16; past 128 one scale spans too much of a column.
BLOCK_SIZES = (16, 32, 64, 128)
DEFAULT_BLOCK_SIZE = 32
_MODE = re.compile(r"int(4|8)/block(16|32|64|128)(/asym)?(?:/acc([0-4]))?")
# MatMulNBits' accuracy_level per bit width (None: fp32 compute, weights dequantized per block).
ACCURACY_LEVEL = {4: None, 8: 4}
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits' attribute: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8


@dataclass(frozen=True)
class QuantMode:
    """How the weights were quantized: ``bits`` (4 or 8) per value, one scale per ``block_size``
    values along K, and a zero point per block when ``asymmetric``; ``accuracy_level`` is
    MatMulNBits' compute (None: this width's default, :data:`ACCURACY_LEVEL`; 4: activations
    quantized to int8 per block, the fast CPU kernel; 0: fp32 compute)."""

    bits: int
    block_size: int = DEFAULT_BLOCK_SIZE
    asymmetric: bool = False
    accuracy_level: int | None = None

    def __str__(self) -> str:
        level = "" if self.accuracy_level is None else f"/acc{self.accuracy_level}"
        return f"int{self.bits}/block{self.block_size}{'/asym' if self.asymmetric else ''}{level}"

    @property
    def weights(self) -> str:
        """``int4`` / ``int8``: the key of this mode's tolerance."""
        return f"int{self.bits}"

    @property
    def level(self) -> int | None:
        """The accuracy_level given to ORT's quantizer (None or 0: not written, fp32 compute)."""
        return ACCURACY_LEVEL[self.bits] if self.accuracy_level is None else self.accuracy_level or None


def quant_mode(
    weights: str, block_size: int = DEFAULT_BLOCK_SIZE, asymmetric: bool = False, accuracy_level: int | None = None
) -> QuantMode:
    """The mode for ``--weights`` / ``--block-size`` / ``--asymmetric`` / ``--accuracy-level``; a
    UsageError for a width, block size or level ORT's MatMulNBits does not take."""
    if weights not in BITS:
        raise UsageError(f"--weights {weights!r}: choose from {', '.join(BITS)}")
    if block_size not in BLOCK_SIZES:
        raise UsageError(f"--block-size {block_size}: choose from {', '.join(map(str, BLOCK_SIZES))}")
    if accuracy_level is not None and accuracy_level not in ACCURACY_LEVELS:
        raise UsageError(f"--accuracy-level {accuracy_level}: choose from {', '.join(map(str, ACCURACY_LEVELS))}")
    return QuantMode(BITS[weights], block_size, asymmetric, accuracy_level)


def parse_mode(text: str) -> QuantMode:
    """The :class:`QuantMode` written as ``text`` (``int4/block32``, ``int8/block64/asym``,
    ``int4/block32/acc4``); a UsageError for anything else (the metadata is in a file anyone
    may edit)."""
    match = _MODE.fullmatch(text)
    if match is None:
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise UsageError(f"metadata {QUANTIZED_KEY}: {shown!r} is no quantization mode (e.g. int4/block32)")
    return QuantMode(int(match[1]), int(match[2]), bool(match[3]), None if match[4] is None else int(match[4]))


def recorded_mode(model: onnx.ModelProto) -> QuantMode | None:
    """The mode a quantized graph records in ``attn2onnx.quantized`` (the last entry where a
    file repeats the key), None for a graph that records none."""
    values = [p.value for p in model.metadata_props if p.key == QUANTIZED_KEY]
    return parse_mode(values[-1]) if values else None


@contextlib.contextmanager
def _ort_quantizer() -> Iterator[ModuleType]:
    """ORT's ``matmul_nbits_quantizer`` module, quiet, with the process's logging left as it
    was: importing it calls ``logging.basicConfig(level=INFO)`` and every node it visits logs
    a line at INFO."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        from onnxruntime.quantization import matmul_nbits_quantizer

        root.setLevel(logging.WARNING)
        yield matmul_nbits_quantizer
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def weight_matmuls(model: onnx.ModelProto) -> list[int]:
    """Indices of the top graph's MatMul nodes whose weight (input B) is a 2-D initializer: what
    the quantizer replaces (function bodies are not its to touch)."""
    weights = {t.name for t in model.graph.initializer if len(t.dims) == 2}
    return [
        i for i, n in enumerate(model.graph.node) if n.op_type == "MatMul" and n.domain == "" and n.input[1] in weights
    ]


def _quantizable(model: onnx.ModelProto) -> list[int]:
    """:func:`weight_matmuls`, refusing (UsageError) a graph already quantized or with none."""
    found = recorded_mode(model)
    if found is not None or any(n.op_type == "MatMulNBits" for n in model.graph.node):
        raise UsageError(f"the graph is already quantized ({found or 'MatMulNBits nodes'}); quantize the fp32 graph")
    targets = weight_matmuls(model)
    if not targets:
        raise UsageError("the graph has no MatMul with a constant 2-D weight: nothing to quantize")
    return targets


def _finish(model: onnx.ModelProto, before: tuple, count: int, mode: QuantMode) -> None:
    """Check that quantization changed only the MatMul weights (a RuntimeError: a bug) and
    record ``mode``."""
    functions, nodes, opsets, props = _untouched(model)
    if (functions, nodes, props) != before[:2] + before[3:] or any(opsets.get(d) != v for d, v in before[2].items()):
        raise RuntimeError("ONNX Runtime's quantizer changed more than the MatMul weights")
    left = len(weight_matmuls(model))
    if left:
        raise RuntimeError(f"ONNX Runtime's quantizer left {left} of {count} MatMul weights in fp32")
    model.metadata_props.add(key=QUANTIZED_KEY, value=str(mode))


def _untouched(model: onnx.ModelProto) -> tuple[list[bytes], list[bytes], dict[str, int], dict[str, str]]:
    """What quantization must leave as it was: the function bodies, the ai.attn2onnx nodes,
    the opset imports and the metadata (serialised, to compare exactly)."""
    from . import custom_ops

    return (
        [f.SerializeToString(deterministic=True) for f in model.functions],
        [n.SerializeToString(deterministic=True) for n in model.graph.node if n.domain == custom_ops.DOMAIN],
        {o.domain: o.version for o in model.opset_import},
        {p.key: p.value for p in model.metadata_props},
    )


def quantize_model(model: onnx.ModelProto, mode: QuantMode) -> int:
    """Quantize the MatMul weights of ``model`` (weights loaded) in place as ``mode`` says and
    record the mode; returns how many MatMuls were quantized. A graph that is already quantized
    or has no MatMul weight is a UsageError; a quantizer that changed anything else (an
    ai.attn2onnx node, a function body, an opset, the metadata) is a bug (RuntimeError)."""
    count = len(_quantizable(model))
    before = _untouched(model)
    with _ort_quantizer() as ort:
        quantizer = ort.MatMulNBitsQuantizer(
            model,
            bits=mode.bits,
            block_size=mode.block_size,
            is_symmetric=not mode.asymmetric,
            accuracy_level=mode.level,
        )
        quantizer.process()
    _finish(model, before, count, mode)
    return count


@dataclass
class QuantizeResult:
    """What :func:`quantize_file` wrote: the mode, how many MatMuls it quantized, and the
    bytes of the input and output models (their external data included)."""

    mode: QuantMode
    matmuls: int
    bytes_before: int
    bytes_after: int


def _file_bytes(path: Path, model: onnx.ModelProto) -> int:
    """Bytes of the model at ``path`` and every external-data file it names."""
    from .onnx_io import model_files

    return sum(f.stat().st_size for f in model_files(path, model))


def quantize_file(source: str | os.PathLike, output: str | os.PathLike, mode: QuantMode) -> QuantizeResult:
    """Read the ONNX model at ``source`` (:func:`attn2onnx.onnx_io.load_onnx`: one-line errors,
    external data checked), quantize it and write it to ``output`` atomically, checked by
    onnx's checker before it replaces anything. A model with its weights inline is quantized
    in memory (:func:`quantize_model`), its weights in ``<output>.data`` where they pass the
    writer's threshold (:func:`attn2onnx.onnx_io.save_model`); one whose weights live in
    external data (any size, billions of parameters included) one weight at a time, its
    weights streamed to ``<output>.data`` (:func:`_quantize_streamed`)."""
    import onnx

    from .fileio import check_destination, refuse_overwriting_inputs
    from .onnx_io import load_onnx, model_files, output_files, save_model

    check_destination(output)
    header = load_onnx(source)
    refuse_overwriting_inputs(output_files(output), model_files(source, header))
    bytes_before = _file_bytes(Path(source), header)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in header.graph.initializer):
        matmuls = _quantize_streamed(header, Path(source), Path(output), mode)
    else:
        del header
        model = load_onnx(source, load_weights=True)
        matmuls = quantize_model(model, mode)
        save_model(model, output, check=_check_structure)
    written = onnx.load(str(output), load_external_data=False)
    return QuantizeResult(mode, matmuls, bytes_before, _file_bytes(Path(output), written))


def _quantize_streamed(model: onnx.ModelProto, source: Path, output: Path, mode: QuantMode) -> int:
    """Quantize ``model`` (read from ``source`` without its weights) to ``output`` one weight
    at a time (:func:`attn2onnx.streaming.quantize.quantize_streamed`), with ORT's per-node
    quantizer configured as :func:`quantize_model` configures ``MatMulNBitsQuantizer``; the
    same checks, written atomically. The count of MatMuls quantized."""
    import onnx

    from .fileio import atomic_output
    from .onnx_io import DATA_SUFFIX
    from .streaming.quantize import quantize_streamed

    targets = _quantizable(model)
    before = _untouched(model)
    with _ort_quantizer() as ort, atomic_output(output, companions=[DATA_SUFFIX]) as tmp:
        config = ort.DefaultWeightOnlyQuantConfig(
            block_size=mode.block_size,
            is_symmetric=not mode.asymmetric,
            accuracy_level=mode.level,
            bits=mode.bits,
        )
        count = quantize_streamed(model, source, tmp, ort.DefaultWeightOnlyQuantizer(config), set(targets))
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.add(domain="com.microsoft", version=1)
        _finish(model, before, count, mode)
        onnx.save(model, str(tmp))
        _check_structure(tmp)
    return count


def _check_structure(path: Path) -> None:
    """The written model as :func:`attn2onnx.onnx_io.load_onnx` reads it (onnx.checker, then
    ORT's own schemas for the com.microsoft MatMulNBits nodes the checker does not know)."""
    from .onnx_io import load_onnx

    load_onnx(path)


__all__ = [
    "BLOCK_SIZES",
    "DEFAULT_BLOCK_SIZE",
    "QUANTIZED_KEY",
    "QuantMode",
    "QuantizeResult",
    "parse_mode",
    "quant_mode",
    "quantize_file",
    "quantize_model",
    "recorded_mode",
]
