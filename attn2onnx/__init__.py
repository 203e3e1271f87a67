"""attn2onnx: export transformers with non-standard attention to ONNX, run them fast in ONNX
Runtime and TensorRT, and prove parity with PyTorch.

Python API (the CLI is ``attn2onnx``):
    build_model(config)   a model of any family around any attention variant (ModelConfig)
    save(model, path)     an attn2onnx checkpoint (config + weights, one .pt file)
    load(path)            the model back (torch.load weights_only=True: never runs code)
    export(model, example_inputs, path)   ONNX with ai.attn2onnx nodes and their bodies
    optimize(in_path, out_path, target)   graph passes for ort / trt / portable
    check_parity(onnx_path, reference, shapes, backends, dtype)   ONNX vs PyTorch -> ParityReport

Names are imported on first use (PEP 562), so ``import attn2onnx`` and ``attn2onnx --help``
stay fast; add an entry to ``_API`` to export a new name.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> submodule that defines it
_API = {
    "build_model": "models",
    "ModelConfig": "models",
    "export": "exporter",
    "optimize": "passes",
    "check_parity": "validate",
    "ParityReport": "validate",
    "save": "checkpoint",
    "load": "checkpoint",
    "UsageError": "errors",
    "CheckpointError": "errors",
    "VariantError": "variants",
}

__all__ = sorted(_API)

if TYPE_CHECKING:  # pragma: no cover  (for type checkers and IDEs)
    from .checkpoint import load, save  # noqa: F401
    from .exporter import export  # noqa: F401
    from .passes import optimize  # noqa: F401
    from .validate import ParityReport, check_parity  # noqa: F401
    from .errors import CheckpointError, UsageError  # noqa: F401
    from .models import ModelConfig, build_model  # noqa: F401
    from .variants import VariantError  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'attn2onnx' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
