"""What the passes did: node counts by op type, MACs and parameter bytes before / after, and the
nodes each pass created.

MACs are counted for the matrix products (MatMul, Gemm, Einsum and the fused attention ops, with
DCMHA's composes) and for floating-point elementwise Mul (one per output element: that is how an
unfused compose does its work), at concrete sizes for the symbolic dims
(``sizes={"batch": 1, "seq": 256}``); other elementwise work is not counted. A dim that cannot be
resolved makes that node's MACs unknown (reported as None).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from attn2onnx.tables import format_table

from ._ir_utils import DOMAIN, count_ops, dims


def _resolve(shape: tuple | None, sizes: dict[str, int]) -> list[int] | None:
    if shape is None:
        return None
    out = []
    for d in shape:
        if isinstance(d, int):
            out.append(d)
        elif isinstance(d, str) and d in sizes:
            out.append(sizes[d])
        else:
            return None
    return out


def _prod(xs) -> int:
    return int(math.prod(xs))


def node_macs(node: ir.Node, sizes: dict[str, int]) -> int | None:
    """Multiply-accumulates of one node at the given sizes (0 for ops that do no matrix work)."""
    ins = [_resolve(dims(v), sizes) if v is not None else None for v in node.inputs]
    out = _resolve(dims(node.outputs[0]), sizes) if node.outputs else None
    if node.domain == "" and node.op_type == "MatMul":
        a = ins[0]
        if a is None or out is None:
            return None
        return _prod(out) * a[-1]
    if node.domain == "" and node.op_type == "Gemm":
        a = ins[0]
        if a is None or out is None:
            return None
        return _prod(out) * (a[0] if node.attributes.get("transA") and node.attributes["transA"].value else a[1])
    if node.domain == "" and node.op_type == "Einsum":
        eq = node.attributes["equation"].value.replace(" ", "")
        lhs = eq.split("->")[0].split(",")
        extent: dict[str, int] = {}
        for letters, shape in zip(lhs, ins):
            if shape is None or "." in letters:
                return None
            for c, n in zip(letters, shape):
                extent[c] = max(extent.get(c, 1), n)
        return _prod(extent.values())
    if node.op_type in ("Attention", "MultiHeadAttention", "GroupQueryAttention") or (
        node.domain == DOMAIN and node.op_type in ("DcmhaAttention", "ProbAttention", "PooledNormAttention")
    ):
        return _attention_macs(node, ins, out)
    if node.domain == DOMAIN and node.op_type == "DcmhaCompose":
        a, qf = ins[0], ins[1]
        if a is None or qf is None:
            return None
        r = (qf[2] - 1) // 2
        return _prod(a) * (4 * r + 2)
    out_type = node.outputs[0].dtype
    if node.domain == "" and node.op_type == "Mul" and out_type is not None and out_type.is_floating_point():
        return None if out is None else _prod(out)  # elementwise products (how unfused composes work)
    if node.domain == DOMAIN and node.op_type == "LandmarkAttention":
        q = ins[0]
        landmarks = node.attributes["landmarks"].value if "landmarks" in node.attributes else None
        if q is None or landmarks is None:
            return None
        b, t, n, d = q  # variants.md §6: about 4 T L N d + 2 T L N^2 (pooling, maps, products, mixing)
        return b * (4 * t * landmarks * n * d + 2 * t * landmarks * n * n)
    if node.domain == DOMAIN and node.op_type == "SuperMix":
        x = ins[0]
        return None if x is None else _prod(x) * x[1]
    return 0


def _attention_macs(node: ir.Node, ins: list, out: list | None) -> int | None:
    """2 * B*N*T*S*d for the two products (plus 2*(4R+2)*B*N*T*S for DCMHA's composes)."""
    q, k = ins[0], ins[1]
    if q is None or k is None or out is None:
        return None
    if node.domain == DOMAIN:  # q [B,T,N,d], k [B,S,N,d]
        b, t, n, d = q
        s = k[1]
        macs = 2 * b * n * t * s * d
        if node.op_type == "DcmhaAttention" and ins[3] is not None:
            r = (ins[3][3] - 1) // 2
            macs += 2 * (4 * r + 2) * b * n * t * s
        return macs
    if len(q) == 4:  # ONNX Attention with 4-D q [B,N,T,d], k [B,N,S,d]
        b, n, t, d = q
        return 2 * b * n * t * k[2] * d
    if len(q) == 3 and len(k) == 3:  # [B,T,D] and [B,S,D]: 2 * B*T*S*D whatever the head count
        b, t, width = q
        return 2 * b * t * k[1] * width
    return None


def param_bytes(model: ir.Model) -> int:
    """Bytes of the initializers (the weights)."""
    total = 0
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is not None:
            shape = tensor.shape.numpy() if hasattr(tensor.shape, "numpy") else tensor.shape
            total += int(np.prod(shape)) * int(tensor.dtype.itemsize)
    return total


def macs(model: ir.Model, sizes: dict[str, int]) -> int | None:
    total = 0
    for node in model.graph:
        m = node_macs(node, sizes)
        if m is None:
            return None
        total += m
    return total


@dataclass
class Snapshot:
    ops: dict[str, int]
    nodes: int
    macs: int | None
    param_bytes: int

    @classmethod
    def of(cls, model: ir.Model, sizes: dict[str, int]) -> "Snapshot":
        ops = count_ops(model)
        return cls(ops, sum(ops.values()), macs(model, sizes), param_bytes(model))


@dataclass
class Report:
    """Before/after summary of one optimize run; ``str()`` gives a readable table."""

    target: str
    sizes: dict[str, int]
    before: Snapshot | None = None
    after: Snapshot | None = None
    passes: list[dict[str, Any]] = field(default_factory=list)  # {"pass": name, "fused": {op: n}, "changed": bool}

    def add(self, name: str, fused: dict[str, int], changed: bool) -> None:
        self.passes.append({"pass": name, "fused": {k: v for k, v in fused.items() if v}, "changed": changed})

    def to_dict(self) -> dict[str, Any]:
        def snap(s: Snapshot | None):
            return None if s is None else {"ops": s.ops, "nodes": s.nodes, "macs": s.macs, "param_bytes": s.param_bytes}

        return {
            "target": self.target,
            "sizes": self.sizes,
            "before": snap(self.before),
            "after": snap(self.after),
            "passes": self.passes,
        }

    def fusions(self) -> dict[str, int]:
        """Fusions over all passes: fused op (or packed MatMul) -> count."""
        return self._totals(fusion=True)

    def other_changes(self) -> dict[str, int]:
        """What passes counted that are not fusions (:data:`NOT_FUSIONS`) -> count."""
        return self._totals(fusion=False)

    def _totals(self, fusion: bool) -> dict[str, int]:
        totals: dict[str, int] = {}
        for entry in self.passes:
            for key, count in entry["fused"].items():
                if (key not in NOT_FUSIONS) == fusion:
                    totals[key] = totals.get(key, 0) + count
        return totals

    def __str__(self) -> str:
        sizes = ", ".join(f"{k}={v}" for k, v in self.sizes.items())
        lines = [f"optimize for {self.target} (MACs counted at {sizes or 'the fixed sizes'})"]
        b, a = self.before, self.after
        if b and a:
            totals = [
                ("nodes", f"{b.nodes:,}", f"{a.nodes:,}"),
                ("MACs", _fmt(b.macs), _fmt(a.macs)),
                ("weight bytes", f"{b.param_bytes:,}", f"{a.param_bytes:,}"),
            ]
            lines += ["", format_table(("", "before", "after"), totals, indent="  ")]
            changed = [
                (op, str(b.ops.get(op, 0)), str(a.ops.get(op, 0)))
                for op in sorted(set(b.ops) | set(a.ops))
                if b.ops.get(op, 0) != a.ops.get(op, 0)
            ]
            if changed:
                lines += ["", format_table(("op type", "nodes before", "after"), changed, indent="  ")]
        rows = [
            (p["pass"], describe_counts(p["fused"]) or ("changed" if p["changed"] else "no change"))
            for p in self.passes
        ]
        lines += ["", format_table(("pass", "what it did"), rows, indent="  ")]
        return "\n".join(lines)


# Counts passes report that are not fusions, and what each is (a count goes before the text).
NOT_FUSIONS: dict[str, str] = {
    "casts": "integer inputs cast to int64 (types the op's schema allows)",
    "Attention mask expanded": "attention masks expanded over the query axis",
    "batched head loop (softmax over keys)": "per-head loops batched into one attention (softmax over keys)",
    "batched head loop (softmax over queries)": "per-head loops batched into one attention (softmax over queries)",
    "tagged": "custom nodes tagged to run as a TensorRT plugin",
    "function_body": "custom nodes with no TensorRT plugin (TensorRT builds their function body)",
}


def describe_counts(counts: dict[str, int]) -> str:
    """A pass's counts in words: ``fused DcmhaAttention x2, packed MatMul x3; 2 custom nodes
    tagged to run as a TensorRT plugin`` (fusions first, other changes said as what they are)."""
    fused = [f"{key} x{n}" for key, n in counts.items() if n and key not in NOT_FUSIONS]
    other = [f"{n} {NOT_FUSIONS[key]}" for key, n in counts.items() if n and key in NOT_FUSIONS]
    parts = ([f"fused {', '.join(fused)}"] if fused else []) + other
    return "; ".join(parts)


def _fmt(x: int | None) -> str:
    return "?" if x is None else f"{x:,}"
