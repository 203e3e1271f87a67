"""Where models come from: attn2onnx checkpoints, torch.export programs (.pt2), folders (a
DCFormer release, a Hugging Face transformers ``save_pretrained`` folder), and, only behind an
explicit opt-in, pickled modules (unpickling runs the file's code) and a transformers folder's
own modeling code.

Every source becomes a :class:`ModelSource`: the module, its input specs (names, dynamic
dims, kinds) and output names, which export, validate and the demo all share.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .errors import UsageError
from .io_spec import InputSpec
from .torch_files import TorchFileError, load_pickled, load_program, register_pytree_library


@dataclass
class ModelSource:
    """A model ready for export: ``module(*example_inputs(b, t))`` runs it. ``size_ranges``:
    the (min, max) batch size and sequence length the model takes where it says (a program's
    Dim ranges; max None when unbounded); ``max_seq`` bounds the sequence too."""

    module: nn.Module
    specs: list[InputSpec]
    output_names: list[str]
    max_seq: int | None = None
    size_ranges: dict[str, tuple[int, int | None]] = field(default_factory=dict)

    def _range(self, name: str) -> tuple[int, int | None]:
        low, high = self.size_ranges.get(name, (1, None))
        if name == "seq" and self.max_seq:
            high = min(high or self.max_seq, self.max_seq)
        return low, high

    def fit(self, batch: int, seq: int) -> tuple[int, int]:
        """(batch, seq) moved into the sizes the model takes: where default shapes run."""
        fitted = []
        for name, size in (("batch", batch), ("seq", seq)):
            low, high = self._range(name)
            fitted.append(max(low, min(size, high or size)))
        return fitted[0], fitted[1]

    def check_shape(self, batch: int, seq: int) -> None:
        """Refuse (UsageError, one line) a shape outside the program's Dim ranges or past ``max_seq``."""
        for name, size in (("batch", batch), ("seq", seq)):
            low, high = self._range(name)
            if name in self.size_ranges and not low <= size <= (high or size):
                bound = f"{low}..{high}" if high else f"at least {low}"
                raise UsageError(
                    f"{name} {size} is outside the program's {name} range {bound} (its Dim); "
                    "pass sizes inside it, or none"
                )
            if name == "seq" and self.max_seq and size > self.max_seq:
                raise UsageError(f"sequence length {size} exceeds the model's maximum {self.max_seq}")

    def example_inputs(self, batch: int = 2, seq: int = 8, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Random torch inputs matching the specs (unpadded masks: export traces one path)."""
        from .io_spec import random_inputs

        batch, seq = self.fit(batch, seq)
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
    """A torch.export program: inputs are its user inputs, positional and keyword, named by its
    signature (:func:`_program_call`), with their dynamic dims as exported, named batch or seq by
    the program's symbols (:func:`_dim_symbols`) and bounded by its Dim ranges
    (:func:`_size_ranges`); outputs named by its output spec (:func:`_output_names`). Read under
    the policy of :mod:`attn2onnx.torch_files` (never unpickled unless ``trust_pickle``)."""
    from .custom_ops import torch_ops  # noqa: F401  (a program holding our ops needs them registered to load)

    program, cause = _load_program(path, trust_pickle)
    if cause is not None and register_pytree_library(cause):  # a Hugging Face ModelOutput, say
        program, cause = _load_program(path, trust_pickle)
    from .importers.program_decode import cache_object_error, program_source, takes_cache

    if cause is not None:
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise cache_object_error(path, reason) or UsageError(f"{path}: not a readable torch.export program ({reason})")

    if takes_cache(program):  # a decode program: its cache in the documented form
        return program_source(program, path)
    module, names = _program_call(program, path)
    inputs = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in program.graph_signature.user_inputs]
    symbols = _dim_symbols([n.meta["val"] for n in inputs])
    specs = []
    for name, node in zip(names, inputs):
        meta = node.meta["val"]
        dims = tuple(
            d if isinstance(d, int) else symbols.get(str(d), "batch" if j == 0 else "seq")
            for j, d in enumerate(meta.shape)
        )
        kind = _input_kind(name, meta.dtype)
        # Ids reaching no embedding have no known vocabulary: random ids for checks stay in [0, 2).
        high = (_vocabulary(node) or 2) if kind == "ids" else 0
        specs.append(InputSpec(name, dims, kind, high))
    ranges = _size_ranges(program, symbols)
    seq_max = ranges.get("seq", (1, None))[1]
    return ModelSource(module, specs, _output_names(program.call_spec.out_spec), seq_max, ranges)


def _load_program(path: Path, trust_pickle: bool) -> tuple[Any, BaseException | None]:
    """(the program, None), or (None, why it did not load: the exception torch.export.load
    logged, which says more than the one it raises). A file the loading policy refuses raises."""
    with held_back_log("torch.export") as logged:
        try:
            return load_program(path, trust_pickle=trust_pickle), None
        except TorchFileError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure to read is a bad file for the user
            return None, next((r.exc_info[1] for r in reversed(logged) if r.exc_info and r.exc_info[1]), e)


class ProgramCall(nn.Module):
    """A loaded program called with its inputs in order, positional ones first: the keyword
    ones (``keywords``) go to it by name, as it was exported (its module refuses them
    positionally), keywords it was given None for get None; its outputs come back flat (a
    tensor, or a tuple in the order of :func:`_output_names`)."""

    def __init__(self, program: nn.Module, positional: int, keywords: list[str], nones: list[str]) -> None:
        super().__init__()
        self.program = program
        self.positional = positional
        self.keywords = keywords
        self.nones = nones

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        kwargs = {**dict.fromkeys(self.nones), **dict(zip(self.keywords, inputs[self.positional :]))}
        leaves = torch.utils._pytree.tree_leaves(self.program(*inputs[: self.positional], **kwargs))
        return leaves[0] if len(leaves) == 1 else tuple(leaves)


def _program_call(program: torch.export.ExportedProgram, path: Path) -> tuple[ProgramCall, list[str]]:
    """The program as a :class:`ProgramCall` whose ``forward`` signature names its inputs (what
    torch.export and the exporter's dynamic_shapes bind by), and those names: a positional
    input's placeholder name, a keyword input's keyword. An input that is not one tensor (a
    list, a dict) is refused in one line."""
    args_spec, kwargs_spec = program.call_spec.in_spec.children()
    placeholders = list(program.graph_signature.user_inputs)
    names, keywords, nones = [], [], []
    for i, child in enumerate(args_spec.children()):
        if not child.is_leaf():
            raise UsageError(f"{path}: positional input {i} of the program is not a tensor; attn2onnx takes tensors")
        names.append(placeholders[len(names)])
    for key, child in zip(kwargs_spec.context or (), kwargs_spec.children()):
        if child.type is type(None):
            nones.append(key)
        elif child.is_leaf():
            names.append(key)
            keywords.append(key)
        else:
            raise UsageError(f"{path}: keyword input {key!r} of the program is not a tensor; attn2onnx takes tensors")
    parameter = inspect.Parameter.POSITIONAL_OR_KEYWORD
    signature = inspect.Signature([inspect.Parameter(n, parameter) for n in ["self", *names]])

    def forward(self: ProgramCall, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        return ProgramCall.forward(self, *inputs)

    forward.__signature__ = signature  # type: ignore[attr-defined]  (read by inspect.signature)
    named = type("ProgramCall", (ProgramCall,), {"forward": forward})
    return named(program.module(), len(names) - len(keywords), keywords, nones), names


class _Leaf:
    """A stand-in for one output while an output spec is unflattened."""


def _output_names(out_spec: torch.utils._pytree.TreeSpec) -> list[str]:
    """Names of a program's flat outputs: their keys in its output spec where each output sits
    under one (a dict or ModelOutput: ``logits``, ``hidden.0``), else ``output`` for one output
    and ``output_0``, ``output_1``.. for several."""
    pytree = torch.utils._pytree
    # Placeholder leaves that are not None: a ModelOutput drops the fields it is given None for.
    leaves = [_Leaf() for _ in range(out_spec.num_leaves)]
    outputs = pytree.tree_unflatten(leaves, out_spec)
    paths = [path for path, _ in pytree.tree_flatten_with_path(outputs, is_leaf=lambda x: isinstance(x, _Leaf))[0]]
    if paths and all(path and isinstance(path[0], (pytree.MappingKey, pytree.GetAttrKey)) for path in paths):
        return [".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in p) for p in paths]
    return default_output_names(len(paths))


def default_output_names(count: int) -> list[str]:
    """Names for ``count`` outputs that have none of their own: ``output``, or ``output_0``.."""
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


def _input_kind(name: str, dtype: torch.dtype) -> str:
    """An input's role by its dtype, and an integer input's by its name: ``*mask*`` a 0/1
    padding mask (Hugging Face's int64 attention_mask), ``*position*`` position ids, else ids. A
    bool input is a mask of unknown convention (True = real, or True = pad as fairseq's and
    nn.MultiheadAttention's key_padding_mask): ``bool_mask``, whose rows hold both values."""
    if dtype == torch.bool:
        return "bool_mask"
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


def _size_ranges(program: torch.export.ExportedProgram, symbols: dict[str, str]) -> dict[str, tuple[int, int | None]]:
    """The (min, max) batch size and sequence length the program was exported for: its batch
    and seq symbols' ranges (max None when unbounded; min at least 1)."""
    ranges = {}
    for symbol, bounds in program.range_constraints.items():
        name = symbols.get(str(symbol))
        if name:
            high = int(bounds.upper) if bounds.upper.is_Integer else None  # int_oo calls itself finite
            ranges[name] = (max(1, int(bounds.lower)), high)
    return ranges


def _release_folder_source(path: Path) -> ModelSource:
    """A folder in the DCFormer PyTorch release's layout (config.json + weights), converted on
    the fly onto the dcmha causal LM (weights only: no code of the folder runs)."""
    from .importers.dcformer import import_dcformer

    return from_module(import_dcformer(path))


def transformers_folder_source(
    path: Path, *, trust_remote_code: bool = False, attn_implementation: str | None = "eager"
) -> ModelSource:
    """A Hugging Face transformers folder (:mod:`attn2onnx.importers.transformers_folder`):
    the model the installed transformers builds from it, weights from safetensors only, its own
    code only with ``trust_remote_code``. ``attn_implementation``: eager (the default: every
    architecture has it and exports it; BLOOM has no sdpa, T5's sdpa does not export), sdpa,
    or None for transformers' own default."""
    from .importers.transformers_folder import folder_inputs, load_model

    model = load_model(path, trust_remote_code=trust_remote_code, attn_implementation=attn_implementation)
    found = folder_inputs(model)
    return ModelSource(found.call, found.specs, found.output_names, found.max_seq)


def load_source(path: str | os.PathLike, *, trust_pickle: bool = False, trust_remote_code: bool = False) -> ModelSource:
    """Load a model file: an attn2onnx checkpoint (.pt), a torch.export program (.pt2), a
    DCFormer release or transformers folder, or a pickled nn.Module when ``trust_pickle`` (never
    by default: unpickling runs code); a transformers folder's own code runs only with
    ``trust_remote_code``."""
    from .checkpoint import load, read_checkpoint
    from .errors import CheckpointError

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if path.is_dir():
        from .importers.transformers_folder import is_transformers_folder

        if is_transformers_folder(path):
            return transformers_folder_source(path, trust_remote_code=trust_remote_code)
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
