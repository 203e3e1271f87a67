"""A DCFormer release folder read lazily: shapes from the safetensors headers, values one layer
at a time, straight from the shard files.

:class:`ReleaseCheckpoint` checks the whole folder up front without reading a weight (every
key, shape and dtype through :func:`attn2onnx.importers.dcformer.map_weights` on ``meta``
tensors: the same one-line errors as the in-memory import), then serves the CausalLM's tensors
by name: :meth:`tensor` reads the release tensors of one layer (``safe_open``, memory-mapped,
closed again) and maps them as the import does; the last layer's tensors are kept, since the
export asks for a layer's weights one after the other.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from ..errors import UsageError
from ..importers.dcformer import (
    DcformerSpec,
    _Weights,
    layer_state,
    map_weights,
    outer_state,
    read_config,
)

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_LAYER = re.compile(r"trunk\.blocks\.(\d+)\.")
_RELEASE_LAYER = re.compile(r"layers\.(\d+)\.")


def _safetensors_error(path: Path, err: Exception) -> UsageError:
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    return UsageError(f"{path}: unreadable safetensors ({first})")


class ReleaseCheckpoint:
    """The release folder ``folder`` (config.json + safetensors shards), checked, read lazily."""

    def __init__(self, folder: str | Path) -> None:
        from safetensors import safe_open

        self.folder = Path(folder)
        self.spec: DcformerSpec = read_config(self.folder)
        self.files = sorted(self.folder.glob("*.safetensors"))
        if not self.files:
            raise UsageError(f"{self.folder}: no *.safetensors weights (a streaming export reads safetensors only)")
        self.where: dict[str, Path] = {}
        self.meta: dict[str, torch.Tensor] = {}
        for path in self.files:
            try:
                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():
                        if key in self.where:
                            raise UsageError(f"{path}: weight {key!r} is also in another file of {self.folder}")
                        part = f.get_slice(key)
                        dtype = _DTYPES.get(part.get_dtype())
                        if dtype is None:
                            raise UsageError(f"{path}: weight {key!r} is {part.get_dtype()}, not floating point")
                        self.where[key] = path
                        self.meta[key] = torch.empty(part.get_shape(), dtype=dtype, device="meta")
            except UsageError:
                raise
            except Exception as err:  # noqa: BLE001 - safetensors raises its own error type
                raise _safetensors_error(path, err) from None
        # every key, shape and option checked now, before any work: the model's tensors as meta
        self.shapes = {name: tuple(t.shape) for name, t in map_weights(self.meta, self.spec, self.folder).items()}
        self._cached: tuple[int | None, dict[str, torch.Tensor]] = (-1, {})

    @property
    def weight_bytes(self) -> int:
        """Bytes of the checkpoint's tensors as stored."""
        return sum(math.prod(t.shape) * t.element_size() for t in self.meta.values())

    def parameters(self) -> int:
        """Numbers in the CausalLM's tensors."""
        return sum(math.prod(shape) for shape in self.shapes.values())

    def _load(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        path = self.where[key]
        try:
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor(key)
        except Exception as err:  # noqa: BLE001
            raise _safetensors_error(path, err) from None

    def _group(self, layer: int | None) -> dict[str, torch.Tensor]:
        """The CausalLM's float32 tensors of one layer (None: those outside the layers)."""
        if self._cached[0] != layer:
            self._cached = (None, {})  # drop the last group before reading the next
            keys = {
                key: t
                for key, t in self.meta.items()
                if (m := _RELEASE_LAYER.match(key)) is not None and int(m[1]) == layer or (m is None and layer is None)
            }
            w = _Weights(keys, self.folder, load=self._load)
            state = outer_state(w, self.spec) if layer is None else layer_state(w, self.spec, layer)
            self._cached = (layer, state)
        return self._cached[1]

    def tensor(self, name: str) -> torch.Tensor:
        """The CausalLM's tensor ``name`` (``embed.weight``, ``trunk.blocks.3.attn.dw1``, ...) in
        float32, read from the shards now."""
        found = _LAYER.match(name)
        group = self._group(int(found[1]) if found else None)
        if name not in group:
            raise KeyError(name)
        return group[name]


__all__ = ["ReleaseCheckpoint"]
