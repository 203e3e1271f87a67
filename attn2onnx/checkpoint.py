"""attn2onnx checkpoints: one ``.pt`` file holding
``{"format": "attn2onnx", "version": 1, "config": <ModelConfig as a plain dict>, "state_dict": ...}``.

Loading goes through :mod:`attn2onnx.torch_files` (zip checks, then torch's weights-only
unpickler): a checkpoint is data, never code, so loading one cannot run anything; its config is
checked against its weights on the meta device before the model is allocated. Every way a
file can fail to load is a one-line ``CheckpointError`` (or ``FileNotFoundError``,
``VariantError``) saying which file and why.
"""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, UsageError
from .fileio import atomic_output
from .models import ModelConfig, build_model
from .models.build import check_size, meta_model
from .models.config import SIZE_FIELDS, count_values
from .torch_files import TorchFileError, load_weights_only
from .variants import VariantError

FORMAT = "attn2onnx"
VERSION = 1


def save(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model`` (built by ``build_model`` / ``load``) to ``path`` atomically: the file
    is written next to its destination and renamed over it, so a crash or an error never
    leaves a partial checkpoint. Returns the path."""
    config = getattr(model, "config", None)
    if not isinstance(config, ModelConfig):
        raise UsageError(
            "save() takes a model made by attn2onnx.build_model or attn2onnx.load (it keeps a ModelConfig as .config)"
        )
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        torch.save(payload, f)
    return Path(path)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checked payload of a checkpoint file (format, version, config, state_dict)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not a checkpoint file")
    try:
        payload = load_weights_only(path)
    except TorchFileError as e:
        raise CheckpointError(f"{path} is not an attn2onnx checkpoint ({e.reason})") from None
    except (PermissionError, MemoryError):
        raise
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e).lower():
            raise CheckpointError(
                f"{path} is not an attn2onnx checkpoint: it holds pickled Python objects, which attn2onnx "
                "does not unpickle (that could run code)"
            ) from None
        raise CheckpointError(f"{path} is not an attn2onnx checkpoint (not a PyTorch file: {_first_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - torch.load fails on foreign bytes in many ways
        raise CheckpointError(
            f"{path} is not an attn2onnx checkpoint (not a PyTorch file, or a damaged one: {_first_line(e)})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        what = "a PyTorch file without the attn2onnx header"
        if isinstance(payload, dict) and payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
            what = "a bare state_dict, with no model config"
        raise CheckpointError(f"{path} is not an attn2onnx checkpoint ({what})")
    version = payload.get("version")
    if version != VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version!r} is not supported (this attn2onnx reads version {VERSION})"
        )
    if not isinstance(payload.get("config"), dict) or not isinstance(payload.get("state_dict"), dict):
        raise CheckpointError(f"{path}: damaged attn2onnx checkpoint (config or state_dict missing)")
    return payload


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """The model saved at ``path``, rebuilt from its config with its weights, in eval mode."""
    payload = read_checkpoint(path)
    try:
        config = ModelConfig.from_dict(payload["config"])
    except VariantError as e:
        raise VariantError(f"{path}: {e}") from None
    except (UsageError, TypeError) as e:
        raise CheckpointError(f"{path}: damaged model config ({_first_line(e)})") from None
    _check_weights_fit(path, config, payload["state_dict"])
    model = build_model(config)
    model.load_state_dict(payload["state_dict"], strict=True)
    return model.to(map_location).eval()


def _check_weights_fit(path: str | os.PathLike, config: ModelConfig, state_dict: dict[str, Any]) -> None:
    """Before anything is allocated: the config's model is one attn2onnx builds, its state has
    the state_dict's names and shapes, and the state_dict's tensors really hold their values.
    So a small file cannot make attn2onnx allocate a large model."""
    try:
        check_size(config)
        skeleton = meta_model(config)
    except UsageError as e:
        raise CheckpointError(f"{path}: {e}") from None
    _check_config_fields(path, config, skeleton.state_dict(), state_dict)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "copying into a meta parameter is a no-op": the point here
            skeleton.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match the model config ({_state_dict_problem(e)})") from None
    held, claimed = _values_held(state_dict), count_values(skeleton)
    if held < claimed:
        raise CheckpointError(f"{path}: its weights store {held:,} values, fewer than their shapes claim ({claimed:,})")


def _check_config_fields(
    path: str | os.PathLike, config: ModelConfig, expected: dict[str, torch.Tensor], state_dict: dict[str, Any]
) -> None:
    """Name the config size field a weight's shape contradicts (a config saying d_model=400000
    over weights of width 16)."""
    for key, want in expected.items():
        got = state_dict.get(key)
        if not isinstance(got, torch.Tensor) or got.shape == want.shape:
            continue
        extra = set(want.shape) - set(got.shape)
        field = next((name for name in SIZE_FIELDS if getattr(config, name) in extra), None)
        if field is not None:
            value, shapes = getattr(config, field), f"{key} {list(want.shape)}, the file holds {list(got.shape)}"
            raise CheckpointError(f"{path}: weights do not match the model config: its {field}={value} makes {shapes}")


def _values_held(state_dict: dict[str, Any]) -> int:
    """Values the state_dict's tensors really hold: their distinct storages' sizes (a
    zero-stride tensor claims more elements than the file stores)."""
    storages = {}
    for tensor in state_dict.values():
        if isinstance(tensor, torch.Tensor):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes() // tensor.element_size()
    return sum(storages.values())


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _state_dict_problem(e: RuntimeError) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return "; ".join(lines[1:3]) if len(lines) > 1 else _first_line(e)


__all__ = ["FORMAT", "VERSION", "load", "read_checkpoint", "save"]
