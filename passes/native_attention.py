"""Plain attention on the native kernel: ``ai.attn2onnx::StandardAttention`` for target ``ort``
(issue 25 items 2-3), where it measured faster than ``com.microsoft.MultiHeadAttention``.

The choice is per shape class -- mask mode (causal / padded: non-causal) and head dim -- from
the table ``native_attention_table.json`` beside this file, which ``python benchmarks/cpu_kernels.py
--core`` writes from its interleaved runs (time of StandardAttention over MultiHeadAttention per
T). A core with a static T takes the ratio of the nearest measured T (log scale); a dynamic T the
geometric mean over the measured T's; a head dim the table lacks, the nearest measured one. A
causal core that also has a key padding mask counts as causal (MultiHeadAttention then needs an
additive [B,1,T,S] bias built per call, which the op never does).

The op takes the masks as modes (``causal``) and the graph's own [B,S] key padding mask (an
all-true one, [B,S] from k's shape, when there is none): no [B,1,T,S] tensor is built. It keeps
the contract's fully masked rows (uniform over all keys) itself, so no row guard is emitted.

On by default for target ``ort``; the passes' ``native`` flag (``optimize`` / ``export --optimize``
``--no-native-attention``) keeps com.microsoft MultiHeadAttention / GroupQueryAttention instead, for
a stock ONNX Runtime: a graph holding the op runs the kernel only where ONNX Runtime has the
attn2onnx kernel library registered (``attn2onnx run`` / ``runtime.session`` do); elsewhere its
function body runs, right but slower than MultiHeadAttention. Decode graphs' cache attention
(fuse_decode_attention, shared_kv) keeps its MultiHeadAttention / GroupQueryAttention forms.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import onnx_ir as ir

from ._ir_utils import DOMAIN, Builder, ensure_function, scope_nodes

OP = "StandardAttention"
TABLE = Path(__file__).with_name("native_attention_table.json")


@functools.lru_cache(maxsize=1)
def load_table(path: Path = TABLE) -> dict:
    """The checked-in choice table: {"classes": {"<mode>/d<head dim>": {"T": [...], "ratio": [...]}}}
    (ratio = StandardAttention time / MultiHeadAttention time); empty when the file is missing."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {"classes": {}}


def shape_class(causal: bool, head_dim: int) -> str:
    return f"{'causal' if causal else 'padded'}/d{head_dim}"


def ratio(table: dict, causal: bool, head_dim: int, t: int | None) -> float | None:
    """Measured time of the native op over MultiHeadAttention's for the nearest class (None: no class
    of this mode in the table)."""
    mode = "causal" if causal else "padded"
    classes = {int(k.split("/d")[1]): v for k, v in table.get("classes", {}).items() if k.startswith(mode + "/")}
    if not classes:
        return None
    near = classes[min(classes, key=lambda d: abs(math.log(d / max(head_dim, 1))))]
    lengths, ratios = near["T"], near["ratio"]
    if isinstance(t, int) and t > 0:
        return ratios[min(range(len(lengths)), key=lambda i: abs(math.log(lengths[i] / t)))]
    return math.exp(sum(math.log(r) for r in ratios) / len(ratios))


def choose(target: str, parts: dict | None, allowed, head_dim: int, t, native: bool, table: dict | None = None) -> bool:
    """Whether a core goes to StandardAttention: target ort with ``native`` on, its mask given as
    parts (key padding and / or causal; an arbitrary boolean tensor stays with the other ops), and
    the table says the op is faster for its class."""
    if not native or target != "ort" or parts is None or allowed is not None:
        return False
    r = ratio(load_table() if table is None else table, bool(parts.get("causal")), head_dim, t)
    return r is not None and r < 1.0


def emit(
    b: Builder, q: ir.Value, k: ir.Value, v: ir.Value, heads: int, kv_heads: int, scale: float, parts: dict, out_dims
) -> ir.Value:
    """StandardAttention on q [B,T,N*d], k [B,S,Hk*d], v [B,S,Hk*dv] with the core's key padding
    mask [B,S] (all true when it has none) and its causal flag as the mode."""
    kpm = parts.get("kpm")
    if kpm is not None and kpm.dtype != ir.DataType.BOOL:
        kpm = b.op("Cast", [kpm], {"to": ir.DataType.BOOL}, dtype=ir.DataType.BOOL, shape=kpm.shape)
    if kpm is None:  # every key real: [B,S] from k's shape
        rows_keys = b.op("Shape", [k], {"start": 0, "end": 2}, dtype=ir.DataType.INT64, shape=(2,))
        kpm = b.op("Expand", [b.const(np.array(True), "true"), rows_keys], dtype=ir.DataType.BOOL, shape=None)
    attrs = {
        "num_heads": heads,
        "kv_num_heads": kv_heads if kv_heads != heads else 0,
        "scale": float(scale),
        "causal": int(bool(parts.get("causal", 0))),
        "window": 0,
    }
    return b.op(OP, [q, k, v, kpm], attrs, domain=DOMAIN, dtype=q.dtype, shape=out_dims)


def count(model: ir.Model) -> int:
    """How many StandardAttention nodes ``model`` holds (the passes report the cores they put on it)."""
    return sum(node.domain == DOMAIN and node.op_type == OP for node in scope_nodes(model))


def attach_function(model: ir.Model) -> None:
    """Attach the op's function body (and import its domain) when the model holds the op."""
    if count(model):
        ensure_function(model, OP)
