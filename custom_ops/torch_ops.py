"""The op set's torch side: importing this module registers every ``ai.attn2onnx`` op with torch
as ``torch.ops.attn2onnx.<name>`` (its PyTorch reference as the eager body, its Triton kernel as
the CUDA one where triton is installed).

Modules that call the ops through ``torch.ops`` (the variants) or load programs holding them
(``torch.export.load``) import it; the package itself stays torch-free, so that running a graph
does not pay for torch.
"""

from __future__ import annotations

from ._common import REGISTRY

for _opdef in REGISTRY.values():
    _opdef.load_torch()
