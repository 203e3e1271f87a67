"""Peak memory of ``attn2onnx optimize`` against the bytes of the model's weights.

    python benchmarks/optimize_memory.py                      # ~1 GiB of weights, this checkout
    python benchmarks/optimize_memory.py --pythonpath /tmp/old --label c7079d4   # another checkout
    python benchmarks/optimize_memory.py --write-results      # append the rows to RESULTS.md

Builds a synthetic model (a chain of MatMuls whose weights are 1 MiB .. 16 MiB float32
initializers) twice: with the weights in one external-data file, and inline in the .onnx file.
For each it runs ``attn2onnx optimize`` in a child process, which reports its own peak resident
set size (VmHWM; a child's ru_maxrss would count this process's size at the fork), given as
peak RSS / weight bytes and as (peak - floor) / weight bytes, the floor being the peak of the
same command on a 1 MiB model (the interpreter and the libraries optimize imports).
``--pythonpath`` runs the code of another checkout on the same models, e.g. the commit before a
change in a ``git worktree`` (with ``attn2onnx/passes`` and ``attn2onnx/custom_ops`` linked to
its ``passes`` and ``custom_ops``).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _results import RESULTS, cpu_model, replace_section  # noqa: E402
from peak_rss import cli_peak_rss  # noqa: E402

HEADER = "## Optimize memory"
# (rows, cols) of the float32 weights, cycled along the chain: 1, 2, 4, 4, 16 and 4 MiB
_SHAPES = [(512, 512), (512, 1024), (1024, 1024), (1024, 512), (512, 2048), (2048, 2048), (2048, 512)]


def build_model(folder: Path, weight_bytes: int, inline: bool = False) -> tuple[Path, int]:
    """A MatMul chain ``x @ W0 @ W1 ...`` with about ``weight_bytes`` of float32 weights stored in
    ``model.onnx.data`` beside ``model.onnx`` (or in it: ``inline``); returns the model's path
    and its exact weight bytes."""
    rng = np.random.default_rng(0)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["batch", 512]))
    nodes, weights, current, total = [], [], x, 0
    while total < weight_bytes or current.shape[-1] != 512:
        shape = next(s for s in _SHAPES[len(weights) % len(_SHAPES) :] + _SHAPES if s[0] == current.shape[-1])
        array = rng.standard_normal(shape, dtype=np.float32) * 0.01
        w = ir.Value(name=f"w{len(weights)}", const_value=ir.tensor(array, name=f"w{len(weights)}"))
        node = ir.node("MatMul", [current, w], num_outputs=1)
        node.outputs[0].name = f"h{len(weights)}"
        node.outputs[0].shape, node.outputs[0].dtype = ir.Shape(["batch", shape[1]]), ir.DataType.FLOAT
        nodes.append(node)
        weights.append(w)
        current, total = node.outputs[0], total + array.nbytes
    graph = ir.Graph([x], [current], nodes=nodes, initializers=weights, opset_imports={"": 21}, name="chain")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    ir.save(ir.Model(graph, ir_version=10), path, external_data=None if inline else "model.onnx.data")
    return path, total


def optimize_peak(model: Path, env: dict[str, str]) -> dict:
    """Peak RSS (as the command's process measured it: tests/peak_rss.py), exit status, wall
    seconds and error line of ``attn2onnx optimize`` on ``model``."""
    start = time.perf_counter()
    rc, peak, err = cli_peak_rss(["optimize", str(model), "-o", str(model.with_name("out.onnx"))], env)
    return {"rc": rc, "peak": peak, "wall": time.perf_counter() - start, "error": err.splitlines()[-1] if rc else ""}


def measure(folder: Path, weight_bytes: int, inline: bool, pythonpath: str | None) -> tuple[int, dict]:
    """Weight bytes and the peak RSS of optimize on a model of about ``weight_bytes`` (and its floor)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([pythonpath, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    small, _ = build_model(folder / "floor", 2**20, inline)
    floor = optimize_peak(small, env)["peak"]
    model, weights = build_model(folder / "model", weight_bytes, inline)
    return weights, {**optimize_peak(model, env), "floor": floor}


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def row(label: str, layout: str, weights: int, r: dict) -> str:
    if r["rc"]:
        return f"| {label} | {layout} | {_gib(weights)} | exit {r['rc']}: {r['error'][:80]} | | | | |"
    return (
        f"| {label} | {layout} | {_gib(weights)} | {_gib(r['floor'])} | {_gib(r['peak'])} | "
        f"{r['peak'] / weights:.2f} | {(r['peak'] - r['floor']) / weights:.2f} | {r['wall']:.0f} s |"
    )


HEAD = (
    "| code | weights | size | floor (1 MiB model) | peak RSS | peak / weights | (peak - floor) / weights | wall |\n"
    "|---|---|---|---|---|---|---|---|"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights-mib", type=int, default=1024, help="weight bytes of the synthetic model (MiB)")
    ap.add_argument("--layouts", nargs="+", choices=("external", "inline"), default=["external", "inline"])
    ap.add_argument("--pythonpath", help="run the attn2onnx of this checkout (prepended to PYTHONPATH)")
    ap.add_argument("--label", default="this checkout", help="row label")
    ap.add_argument("--write-results", action="store_true", help="append the rows to RESULTS.md's section")
    args = ap.parse_args()
    rows = []
    for layout in args.layouts:
        with tempfile.TemporaryDirectory() as tmp:
            weights, r = measure(Path(tmp), args.weights_mib * 2**20, layout == "inline", args.pythonpath)
        rows.append(row(args.label, layout, weights, r))
        print(rows[-1] if len(rows) > 1 else f"{HEAD}\n{rows[-1]}", flush=True)
    if args.write_results:
        cmd = " ".join(["python", "benchmarks/optimize_memory.py", *sys.argv[1:]])
        append_rows(f"`{cmd}` on {cpu_model()}", rows)


def append_rows(command: str, rows: list[str]) -> None:
    """Add this run (its command line, then its rows) to the end of RESULTS.md's section."""
    text = RESULTS.read_text() if RESULTS.exists() else ""
    match = re.search(rf"^{re.escape(HEADER)}\n.*?(?=^## |\Z)", text, re.S | re.M)
    old = match.group(0).rstrip() + "\n\n" if match else f"{HEADER}\n\n"
    replace_section(HEADER, old + f"{command}\n\n{HEAD}\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
