"""attn2onnx checkpoints: one ``.pt`` file holding
``{"format": "attn2onnx", "version": 1, "config": <ModelConfig as a plain dict>, "state_dict": ...}``.

Loading uses ``torch.load(weights_only=True)``: a checkpoint is data, never code, so loading
one cannot run anything. Every way a file can fail to load is a one-line ``CheckpointError``
(or ``FileNotFoundError``, ``VariantError``) saying which file and why.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, UsageError
from .fileio import atomic_output
from .models import ModelConfig, build_model
from .variants import VariantError

FORMAT = "attn2onnx"
VERSION = 1


def save(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model`` (built by ``build_model`` / ``load``) to ``path`` atomically: the file
    is written next to its destination and renamed over it, so a crash or an error never
    leaves a partial checkpoint. Returns the path."""
    config = getattr(model, "config", None)
    if not isinstance(config, ModelConfig):
        raise UsageError("save() takes a model made by attn2onnx.build_model or attn2onnx.load (it keeps a ModelConfig as .config)")
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
        payload = torch.load(path, map_location="cpu", weights_only=True)
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
        raise CheckpointError(f"{path} is not an attn2onnx checkpoint (not a PyTorch file, or a damaged one: {_first_line(e)})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        what = "a PyTorch file without the attn2onnx header"
        if isinstance(payload, dict) and payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
            what = "a bare state_dict, with no model config"
        raise CheckpointError(f"{path} is not an attn2onnx checkpoint ({what})")
    version = payload.get("version")
    if version != VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version!r} is not supported (this attn2onnx reads version {VERSION})")
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
    model = build_model(config)
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match the model config ({_state_dict_problem(e)})") from None
    return model.to(map_location).eval()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _state_dict_problem(e: RuntimeError) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return "; ".join(lines[1:3]) if len(lines) > 1 else _first_line(e)


__all__ = ["FORMAT", "VERSION", "load", "read_checkpoint", "save"]
