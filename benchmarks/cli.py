"""CLI startup benchmark (issue 22 item 1): per command, the time to its first error (a usage
error, a missing file) or to its first result (``--help``, ``variants``, ``doctor``, ``run`` of a
small graph, ``generate``, ``optimize``), whether it imported torch, and what its imports cost.

Each row runs ``python -m attn2onnx ARGS`` in a fresh interpreter and times it to exit (the error
or the result is the last thing it prints): the median of --repeats runs after one warm-up run
(the disk cache, a native kernel build). One more run under ``python -X importtime`` gives the
import time by top-level package (the sum of importtime's self column over its modules).

``--before REV`` times the source tree of git revision REV as well (a temporary ``git worktree``
put first on PYTHONPATH, its custom_ops / passes linked where the installed package has them),
interleaved with the working tree run by run, so both see the same machine load:

    python benchmarks/cli.py --before HEAD~3           # prints, writes RESULTS.md "CLI startup"
    python benchmarks/cli.py --repeats 1 --no-write    # the working tree only
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import cpu_model, replace_section  # noqa: E402

SECTION = "## CLI startup"
REPO = Path(__file__).resolve().parent.parent
# Packages installed from folders at the top of the repo (setup.py), linked into a --before tree.
SUBTREES = {"custom_ops": "attn2onnx/custom_ops", "passes": "attn2onnx/passes"}

# Row -> attn2onnx arguments, run in a folder holding add.onnx (standard ops) and lm.onnx (a
# one-layer dcmha LM exported for decode: DcmhaAttention nodes, decode metadata); the other
# files named do not exist.
FIRST_ERROR = {
    "run missing.onnx": ["run", "missing.onnx"],
    "generate missing.onnx": ["generate", "missing.onnx", "--prompt", "hi"],
    "optimize missing.onnx": ["optimize", "missing.onnx", "-o", "o.onnx"],
    "run add.onnx --batch 0": ["run", "add.onnx", "--batch", "0"],
    "export missing.pt": ["export", "missing.pt", "-o", "x.onnx"],
    "validate missing.onnx": ["validate", "missing.onnx", "--reference", "missing.pt"],
    "new foo (unknown variant)": ["new", "foo", "-o", "x.pt"],
    "convert missing-folder": ["convert", "missing-folder", "-o", "x.pt"],
    "demo --variants foo": ["demo", "--variants", "foo", "--out", "demo_out"],
}
FIRST_RESULT = {
    "--help": ["--help"],
    "variants": ["variants"],
    "doctor": ["doctor"],
    "run add.onnx (standard ops)": ["run", "add.onnx"],
    "run lm.onnx (decode, DcmhaAttention)": ["run", "lm.onnx"],
    "generate lm.onnx (4 tokens)": ["generate", "lm.onnx", "--prompt", "hi", "--max-new-tokens", "4"],
    "optimize lm.onnx": ["optimize", "lm.onnx", "-o", "lm.opt.onnx"],
}
TOP_PACKAGES = 3  # packages named per row in the import column


def write_graphs(folder: Path) -> None:
    """add.onnx (y = x + x over x [batch, seq, 4]) and lm.onnx (a tiny dcmha LM, decode export)."""
    import onnx
    from onnx import TensorProto, helper

    import attn2onnx
    from attn2onnx.models.decode import export_decode

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 4])
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "add", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]), str(folder / "add.onnx"))
    config = attn2onnx.ModelConfig(family="lm", variant="dcmha", layers=1, d_model=16, heads=2, max_len=32)
    export_decode(attn2onnx.build_model(config).eval(), folder / "lm.onnx")


@contextlib.contextmanager
def source_tree(rev: str) -> Iterator[Path]:
    """A temporary git worktree of ``rev`` whose attn2onnx package holds its own custom_ops and
    passes (links), as the installed package does; removed afterwards."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), rev], check=True)
        try:
            for folder, link in SUBTREES.items():
                (tree / link).symlink_to(tree / folder, target_is_directory=True)
            yield tree
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=True)


def command(args: list[str], tree: Path | None, folder: Path, importtime: bool = False) -> tuple[float, str, int]:
    """(wall seconds, stderr, exit status) of ``python -m attn2onnx ARGS`` run in ``folder``."""
    env = dict(os.environ)
    env.pop("ATTN2ONNX_DEBUG", None)
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), env.get("PYTHONPATH")]))
    flags = ["-X", "importtime"] if importtime else []
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, *flags, "-m", "attn2onnx", *args], capture_output=True, text=True, env=env, cwd=folder
    )
    return time.perf_counter() - start, done.stderr, done.returncode


def import_costs(stderr: str) -> dict[str, float]:
    """Seconds of import per top-level package (importtime's self times summed), largest first."""
    costs: collections.Counter[str] = collections.Counter()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "self [us]" not in line:
            own, _, name = line.removeprefix("import time:").split("|")
            costs[name.strip().split(".")[0]] += int(own) / 1e6
    return dict(costs.most_common())


def measure(rows: dict[str, list[str]], trees: dict[str, Path | None], folder: Path, repeats: int) -> dict:
    """Per row and tree: the median wall time, the exit status and the import costs. Runs
    interleave tree by tree within each row and repeat, after one warm-up run of each."""
    walls: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    status: dict[tuple[str, str], int] = {}
    for round_ in range(repeats + 1):
        for name, args in rows.items():
            for label, tree in trees.items():
                wall, _, code = command(args, tree, folder)
                status[name, label] = code
                if round_:  # round 0 warms up
                    walls[name, label].append(wall)
    imports = {
        (name, label): import_costs(command(args, tree, folder, importtime=True)[1])
        for name, args in rows.items()
        for label, tree in trees.items()
    }
    return {key: (statistics.median(walls[key]), status[key], imports[key]) for key in walls}


def table(rows: dict[str, list[str]], trees: list[str], results: dict) -> list[str]:
    """Markdown rows: per command, each tree's wall time, torch, import total and top packages;
    with two trees, the ratio of the first's wall time to the second's."""
    head = "| `attn2onnx ...` | exit | " + " | ".join(f"{t}: s | {t}: torch | {t}: imports (s)" for t in trees)
    head += " | speed-up |" if len(trees) == 2 else " |"
    lines = [head, "|" + "---|" * (2 + 3 * len(trees) + (len(trees) == 2))]
    for name in rows:
        cells, walls = [], []
        for label in trees:
            wall, code, costs = results[name, label]
            top = ", ".join(f"{pkg} {s:.2f}" for pkg, s in list(costs.items())[:TOP_PACKAGES])
            cells.append(f"{wall:.2f} | {'yes' if 'torch' in costs else 'no'} | {sum(costs.values()):.2f}: {top}")
            walls.append(wall)
        codes = sorted({results[name, label][1] for label in trees})
        line = f"| {name} | {'/'.join(map(str, codes))} | " + " | ".join(cells)
        lines.append(line + (f" | {walls[0] / walls[1]:.1f}x |" if len(trees) == 2 else " |"))
    return lines


def load_average() -> str:
    """The 1-minute load average where the OS says (the machine is shared)."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except (AttributeError, OSError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per command and tree (median)")
    parser.add_argument("--before", metavar="REV", help="git revision to time as 'before' (a temporary worktree)")
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    opts = parser.parse_args()
    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        write_graphs(folder)
        trees: dict[str, Path | None] = {"now": None}
        if opts.before:
            trees = {"before": stack.enter_context(source_tree(opts.before)), "after": None}
        load_start = load_average()
        results = measure({**FIRST_ERROR, **FIRST_RESULT}, trees, folder, opts.repeats)
        load_end = load_average()
    sections = []
    for title, rows in (("First error (usage error, missing file)", FIRST_ERROR), ("First result", FIRST_RESULT)):
        sections.append(f"{title}:\n\n" + "\n".join(table(rows, list(trees), results)))
    text = "\n\n".join(sections)
    print(text)
    if opts.no_write:
        return
    revision = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    before = f"before: `{opts.before}`; after: the working tree at {revision}" if opts.before else f"{revision}"
    replace_section(
        SECTION,
        f"{SECTION}\n\n"
        f"`python benchmarks/cli.py{' --before REV' if opts.before else ''} --repeats {opts.repeats}` ({before}). "
        f"Machine: {cpu_model()}, {os.cpu_count()} cores shared with other jobs (load average {load_start} at "
        f"the start, {load_end} at the end), Python {platform.python_version()}. s: `python -m attn2onnx ...` "
        "in a fresh interpreter to exit, median of the repeats after a warm-up run, the trees interleaved run by "
        "run; torch: whether it was imported; imports: `python -X importtime`'s self times summed, in all and "
        f"for the {TOP_PACKAGES} costliest top-level packages; exit: the exit status (2: the one-line error). "
        "add.onnx: y = x + x; lm.onnx: a one-layer dcmha LM exported for decode.\n\n"
        f"{text}\n",
    )


if __name__ == "__main__":
    main()
