"""CLI startup benchmark (issue 22 item 1): how long each command takes to its first line when
that line is an error (a missing file, an unknown variant) or needs no model, what it imports.

Per command: ``python -X importtime -m attn2onnx ARGS`` in a fresh interpreter, the wall time to
exit (median of --repeats), the total import time (sum of importtime's self column, first run),
and whether torch was imported. --baseline DIR times another source tree of attn2onnx as well
(its package put first on PYTHONPATH), e.g. the commit before the lazy imports:

    git archive 4501b30 | tar -x -C /tmp/base
    python benchmarks/cli_startup.py --baseline /tmp/base     # prints, writes RESULTS.md "CLI startup"
    python benchmarks/cli_startup.py --repeats 1 --no-write
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import cpu_model, replace_section  # noqa: E402

SECTION = "## CLI startup"


def commands(folder: Path) -> dict[str, list[str]]:
    """Row name -> attn2onnx arguments; files named here do not exist unless written below."""
    plain = folder / "add.onnx"  # a standard-ops graph (no ai.attn2onnx node)
    write_plain_graph(plain)
    return {
        "--help": ["--help"],
        "run missing.onnx": ["run", str(folder / "missing.onnx")],
        "run add.onnx (plain graph)": ["run", str(plain)],
        "generate missing.onnx": ["generate", str(folder / "missing.onnx"), "--prompt", "hi"],
        "optimize missing.onnx": ["optimize", str(folder / "missing.onnx"), "-o", str(folder / "o.onnx")],
        "export missing.pt": ["export", str(folder / "missing.pt"), "-o", str(folder / "x.onnx")],
        "new foo (unknown variant)": ["new", "foo", "-o", str(folder / "x.pt")],
        "doctor": ["doctor"],
        "variants": ["variants"],
    }


def write_plain_graph(path: Path) -> None:
    """y = x + x over x [batch, seq, 4]: the smallest graph `run` takes on random inputs."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 4])
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "add", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]), str(path))


def measure(args: list[str], tree: Path | None) -> tuple[float, float, bool]:
    """(wall seconds, import seconds, torch imported) of one ``python -X importtime -m attn2onnx ARGS``."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("ATTN2ONNX_DEBUG", None)
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), env.get("PYTHONPATH")]))
    start = time.perf_counter()
    done = subprocess.run(  # cwd: not the checkout, which `-m` would put before PYTHONPATH
        [sys.executable, "-X", "importtime", "-m", "attn2onnx", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tempfile.gettempdir(),
    )
    wall = time.perf_counter() - start
    self_us, names = 0, set()
    for line in done.stderr.splitlines():
        if line.startswith("import time:") and "|" in line and "self [us]" not in line:
            own, _, name = line.removeprefix("import time:").split("|")
            self_us += int(own)
            names.add(name.strip())
    return wall, self_us / 1e6, "torch" in names


def row(args: list[str], tree: Path | None, repeats: int) -> tuple[float, float, bool]:
    """The median wall time over ``repeats`` runs, the first run's import time and torch flag."""
    runs = [measure(args, tree) for _ in range(repeats)]
    return statistics.median(r[0] for r in runs), runs[0][1], runs[0][2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="runs per command (median wall time)")
    parser.add_argument("--baseline", type=Path, help="another source tree to time as 'before'")
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    opts = parser.parse_args()
    trees = {"before": opts.baseline, "after": None} if opts.baseline else {"now": None}
    with tempfile.TemporaryDirectory() as tmp:
        table = commands(Path(tmp))
        results = {
            label: {name: row(a, tree, opts.repeats) for name, a in table.items()} for label, tree in trees.items()
        }
    head = "| command | " + " | ".join(f"{label}: wall s | import s | torch" for label in trees) + " |"
    lines = [head, "|" + "---|" * (1 + 3 * len(trees))]
    for name in table:
        cells = [f"{w:.2f} | {i:.2f} | {'yes' if t else 'no'}" for w, i, t in (results[lb][name] for lb in trees)]
        lines.append(f"| `attn2onnx {name}` | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    if opts.no_write:
        return
    command = "python benchmarks/cli_startup.py" + (" --baseline DIR" if opts.baseline else "")
    replace_section(
        SECTION,
        f"{SECTION}\n\n"
        f"`{command}` (--repeats {opts.repeats}; DIR: the tree before the lazy imports). Machine: {cpu_model()}, "
        f"{os.cpu_count()} cores (shared), Python {platform.python_version()}. wall: `python -X importtime -m "
        "attn2onnx ARGS` to exit, median; import: the sum of importtime's self times; torch: whether it was "
        "imported. Errors and --help answer without torch; `run` of a graph and `doctor` still import it "
        "through the op set (custom_ops: each op's PyTorch reference, its rules in _common), `variants` "
        "through the variant modules.\n\n"
        f"{text}\n",
    )


if __name__ == "__main__":
    main()
