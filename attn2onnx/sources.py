"""Where models come from: attn2onnx checkpoints, torch.export programs (.pt2), and, only
behind an explicit opt-in, pickled modules (unpickling runs the file's code).

Every source becomes a :class:`ModelSource`: the module, its input specs (names, dynamic
dims, kinds) and output names, which export, validate and the demo all share.
"""

from __future__ import annotations

import contextlib
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .errors import UsageError
from .io_spec import InputSpec
from .torch_files import TorchFileError, load_pickled, load_program


@dataclass
class ModelSource:
    """A model ready for export: ``module(*example_inputs(b, t))`` runs it."""

    module: nn.Module
    specs: list[InputSpec]
    output_names: list[str]
    max_seq: int | None = None

    def example_inputs(self, batch: int = 2, seq: int = 8, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Random torch inputs matching the specs (unpadded masks: export traces one path)."""
        from .io_spec import random_inputs

        seq = min(seq, self.max_seq) if self.max_seq else seq
        feeds = random_inputs(self.specs, batch, seq, seed=seed, pad=False)
        return tuple(torch.from_numpy(feeds[s.name]) for s in self.specs)


def eval_mode(model: nn.Module) -> nn.Module:
    """The model in eval mode. The module of a loaded torch.export program refuses eval(); its
    graph was already traced in the mode its author exported it in."""
    try:
        model.eval()
    except NotImplementedError:
        pass
    return model


def family_specs(model: nn.Module) -> tuple[list[InputSpec], list[str], int | None]:
    """Input specs, output names and the longest sequence of an attn2onnx family model."""
    config = model.config
    mask = InputSpec("key_padding_mask", ("batch", "seq"), "mask")
    if config.family == "lm":
        return [InputSpec("input_ids", ("batch", "seq"), "ids", config.vocab_size), mask], ["logits"], config.max_len
    if config.family == "encoder":
        if config.is_image:
            side = config.image_size
            return [InputSpec("pixels", ("batch", config.channels, side, side), "float")], ["logits"], None
        return (
            [InputSpec("input_ids", ("batch", "seq"), "ids", config.vocab_size), mask],
            ["logits"],
            config.max_len - 1,
        )
    return [InputSpec("x", ("batch", "seq", config.d_model), "float"), mask], ["y"], config.max_len


def from_module(model: nn.Module) -> ModelSource:
    """A family model built by attn2onnx (it carries ``model.config``)."""
    if not hasattr(model, "config") or not hasattr(model.config, "family"):
        raise UsageError("this module is not an attn2onnx model family; use attn2onnx.export with example inputs")
    specs, outputs, max_seq = family_specs(model)
    return ModelSource(model.eval(), specs, outputs, max_seq)


@contextlib.contextmanager
def held_back_log(name: str) -> Iterator[list[logging.LogRecord]]:
    """Keep the records logged to logger ``name`` inside the block off the terminal and hand
    them to the caller: torch.export.load logs a bad file's traceback as a warning, then raises
    a vaguer error of its own, so the caller words its one line from the logged exception."""
    records: list[logging.LogRecord] = []

    def keep(record: logging.LogRecord) -> bool:
        records.append(record)
        return False  # a logger filter that refuses the record: no handler prints it

    logger = logging.getLogger(name)
    logger.addFilter(keep)
    try:
        yield records
    finally:
        logger.removeFilter(keep)


def _dim_symbols(metas: list[torch.Tensor]) -> dict[str, str]:
    """A program's batch and sequence symbols: those of its reference input's dims 0 and 1
    (:func:`attn2onnx.io_spec.reference_sizes`), so ``freqs`` [T, d/2, 2] gets ``seq``, not ``batch``."""
    from .io_spec import reference_sizes

    _, batch, seq = reference_sizes(metas)
    return {str(d): name for name, d in (("seq", seq), ("batch", batch)) if d is not None and not isinstance(d, int)}


def _program_source(path: Path, trust_pickle: bool) -> ModelSource:
    """A torch.export program: inputs are its user inputs, with their dynamic dims as exported,
    named batch or seq by the program's symbols (:func:`_dim_symbols`). Read under the policy of
    :mod:`attn2onnx.torch_files` (never unpickled unless ``trust_pickle``)."""
    from . import custom_ops  # noqa: F401  (a program holding our ops needs them registered to load)

    try:
        with held_back_log("torch.export") as logged:
            program = load_program(path, trust_pickle=trust_pickle)
    except TorchFileError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to read is a bad file for the user
        cause = next((r.exc_info[1] for r in reversed(logged) if r.exc_info and r.exc_info[1]), e)
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise UsageError(f"{path}: not a readable torch.export program ({reason})") from None
    module = program.module()
    inputs = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in program.graph_signature.user_inputs]
    symbols = _dim_symbols([n.meta["val"] for n in inputs])
    specs = []
    for node in inputs:
        meta = node.meta["val"]
        dims = tuple(
            d if isinstance(d, int) else symbols.get(str(d), "batch" if j == 0 else "seq")
            for j, d in enumerate(meta.shape)
        )
        kind = _input_kind(node.name, meta.dtype)
        # Ids reaching no embedding have no known vocabulary: random ids for checks stay in [0, 2).
        high = (_vocabulary(node) or 2) if kind == "ids" else 0
        specs.append(InputSpec(node.name, dims, kind, high))
    return ModelSource(module, specs, ["output"], _max_seq(program, symbols))


def _input_kind(name: str, dtype: torch.dtype) -> str:
    """An input's role by its dtype, and an integer input's by its name: ``*mask*`` a 0/1
    padding mask (Hugging Face's int64 attention_mask), ``*position*`` position ids, else ids."""
    if dtype == torch.bool:
        return "mask"
    if dtype.is_floating_point or dtype.is_complex:
        return "float"
    lowered = name.lower()
    return "int_mask" if "mask" in lowered else "positions" if "position" in lowered else "ids"


# aten ops that carry ids through unchanged (a new view, layout or copy of the same values).
_SAME_VALUES = frozenset(
    "reshape view _unsafe_view unsqueeze squeeze flatten clone contiguous expand permute transpose "
    "t slice select alias detach lift_fresh_copy".split()
)


def _vocabulary(node: torch.fx.Node) -> int | None:
    """The rows of the first embedding table that the ids of placeholder ``node`` index, following
    them through ops that keep their values (``aten.embedding(weight, ids)``, ``weight[ids]``,
    ``index_select(weight, 0, ids)``); None when they reach none."""
    seen, queue = {node}, [node]
    while queue:
        current = queue.pop(0)
        for user in current.users:
            target = user.target
            if not isinstance(target, torch._ops.OpOverload) or target.namespace != "aten" or user in seen:
                continue
            args = user.args
            table = (
                args[0]
                if (target._opname == "embedding" and args[1] is current)
                or (target._opname == "index" and args[1] and args[1][0] is current)
                or (target._opname == "index_select" and args[1] == 0 and args[2] is current)
                else None
            )
            if isinstance(table, torch.fx.Node) and isinstance(table.meta.get("val"), torch.Tensor):
                rows = table.meta["val"].shape[0]
                return rows if isinstance(rows, int) else None
            if target._opname in _SAME_VALUES and args[0] is current:
                seen.add(user)
                queue.append(user)
    return None


def _max_seq(program: torch.export.ExportedProgram, symbols: dict[str, str]) -> int | None:
    """The longest sequence the program was exported for: its seq symbol's upper bound (None
    when unbounded or when no input has a dynamic sequence dim)."""
    for symbol, bounds in program.range_constraints.items():
        if symbols.get(str(symbol)) == "seq" and bounds.upper.is_finite:
            return int(bounds.upper)
    return None


def _release_folder_source(path: Path) -> ModelSource:
    """A folder in the DCFormer PyTorch release's layout (config.json + weights), converted on
    the fly onto the dcmha causal LM (weights only: no code of the folder runs)."""
    from .importers.dcformer import import_dcformer

    return from_module(import_dcformer(path))


def load_source(path: str | os.PathLike, *, trust_pickle: bool = False) -> ModelSource:
    """Load a model file: an attn2onnx checkpoint (.pt), a torch.export program (.pt2), or a
    pickled nn.Module when ``trust_pickle`` (never by default: unpickling runs code)."""
    from .checkpoint import load, read_checkpoint
    from .errors import CheckpointError

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if path.is_dir():
        return _release_folder_source(path)
    if not path.is_file():
        raise UsageError(f"{path} is not a file")
    if path.suffix == ".pt2":
        return _program_source(path, trust_pickle)
    try:
        read_checkpoint(path)
    except CheckpointError:
        if not trust_pickle:
            raise
        try:
            module = load_pickled(path)
        except (RuntimeError, EOFError, zipfile.BadZipFile, AttributeError, ModuleNotFoundError) as e:
            raise UsageError(f"{path}: cannot unpickle a module ({str(e).splitlines()[0]})") from None
        if not isinstance(module, nn.Module):
            raise UsageError(f"{path} holds a {type(module).__name__}, not a torch.nn.Module") from None
        return from_module(module)
    return from_module(load(path))
