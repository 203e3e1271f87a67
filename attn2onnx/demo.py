"""The main job: for every variant, build a small model in a family it fits, export it, run it
in ONNX Runtime, validate it against PyTorch at several dynamic shapes, and time both."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from .progress import Progress
from .tables import format_table as aligned

TIMING_SHAPE = (1, 64)
WARMUP, ITERATIONS = 2, 10  # demo's PyTorch vs ORT timing: rounds, interleaved (attn2onnx.timing)
# One intra-op thread each: on a loaded machine PyTorch's thread pool swung a 1 ms call to 20-1000 ms
# (its threads wait on each other), and these small models gain nothing from more threads.
TIMING_THREADS = 1


@dataclass
class DemoRow:
    variant: str
    family: str
    nodes: int
    optimized_nodes: int
    custom_nodes: int
    optimized_custom_nodes: int
    export_s: float
    max_abs_err: float
    ort_ms: float
    torch_ms: float
    passed: bool

    @property
    def speedup(self) -> float:
        """PyTorch's median time over ORT's: above 1, ORT is faster."""
        return self.torch_ms / self.ort_ms


def demo_variant(name: str, out_dir: Path, stage: Callable[[str], None] = lambda s: None) -> DemoRow:
    """Export, optimise (ort target), validate and time one variant's demo model; ``stage``
    hears each step's name. PyTorch and ORT are timed alike: TIMING_THREADS intra-op threads,
    WARMUP untimed rounds, then ITERATIONS rounds, each calling both (interleaved), median of each."""
    from .exporter import export
    from .passes import optimize
    from .io_spec import random_inputs
    from .models import ModelConfig, build_model
    from .runtime import session
    from .sources import from_module
    from .timing import time_calls
    from .validate import check_parity
    from .variants import get_variant

    family = "lm" if get_variant(name).causal else "encoder"
    model = build_model(ModelConfig(family=family, variant=name, layers=2, d_model=64, heads=4, max_len=128, seed=0))
    source = from_module(model)
    stage("export")
    result = export(
        model,
        source.example_inputs(2, 16),
        out_dir / f"{name}.onnx",
        specs=source.specs,
        output_names=source.output_names,
        max_seq=source.max_seq,
    )
    optimized = out_dir / f"{name}.opt.onnx"
    stage("optimise")
    report = optimize(result.path, optimized, target="ort")
    stage("validate")
    comparisons = [c for path in (result.path, optimized) for c in check_parity(path, source).comparisons]
    stage("time")
    feeds = random_inputs(source.specs, *TIMING_SHAPE, seed=1)
    sess = session(str(optimized), threads=TIMING_THREADS)
    args = [torch.from_numpy(feeds[s.name]) for s in source.specs]
    torch_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(TIMING_THREADS)
        with torch.inference_mode():
            calls = {"torch": lambda: model(*args), "ort": lambda: sess.run(None, feeds)}
            timings = time_calls(calls, WARMUP, ITERATIONS)
    finally:
        torch.set_num_threads(torch_threads)
    return DemoRow(
        name,
        family,
        report.before.nodes,  # both counted alike (every scope, not our ops' bodies)
        report.after.nodes,
        custom_nodes(report.before.ops),
        custom_nodes(report.after.ops),
        result.seconds,
        max(c.max_abs_err for c in comparisons),
        timings["ort"].median_ms,
        timings["torch"].median_ms,
        all(c.passed for c in comparisons),
    )


def custom_nodes(ops: dict[str, int]) -> int:
    """ai.attn2onnx nodes among a passes Snapshot's op counts."""
    from .custom_ops import DOMAIN

    return sum(n for op, n in ops.items() if op.startswith(f"{DOMAIN}::"))


def run_demo(out_dir: Path, variants: list[str] | None = None, progress: Progress | None = None) -> list[DemoRow]:
    """Demo rows for ``variants`` (default: every registered variant), with a bar over them
    naming the variant and its step when ``progress`` shows."""
    from .variants import VARIANTS

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    with (progress or Progress(False)).bar(len(variants or VARIANTS), "demo", unit="variant") as bar:
        for name in variants or list(VARIANTS):
            rows.append(demo_variant(name, out_dir, stage=lambda step: bar.set_postfix_str(f"{name}: {step}")))
            bar.update()
    return rows


# Why a graph has more nodes after optimisation than after export (the table's footnotes).
LOWERED_NOTE = (
    "* more nodes after optimisation: custom ops lowered onto standard ones (a custom op counts as one node; "
    "its lowering, e.g. PooledNormAttention's pooling per factor and fused attention, as many)"
)
MASK_NOTE = (
    "+ more nodes after optimisation: each fused attention takes its mask from a few small ops (Shape, Trilu, "
    "Expand, fully masked rows kept uniform) that the Softmax / MatMul chain it replaced did not need; "
    "the work goes down"
)


def growth_mark(row: DemoRow) -> str:
    """The footnote mark of a row whose graph grew: ``*`` custom ops lowered, ``+`` mask ops."""
    if row.optimized_nodes <= row.nodes:
        return ""
    return "*" if row.optimized_custom_nodes < row.custom_nodes else "+"


def format_table(rows: list[DemoRow]) -> str:
    """The demo's table, one row per variant, and what a reader needs to read it."""
    header = (
        "variant",
        "family",
        "nodes exported",
        "nodes for ORT",
        "custom ops",
        "export s",
        "max abs err",
        "PyTorch ms",
        "ORT ms",
        "ORT speed-up",
        "parity",
    )
    marks = {growth_mark(r) for r in rows}
    cells = [
        (
            r.variant,
            r.family,
            str(r.nodes),
            f"{r.optimized_nodes}{growth_mark(r)}",
            str(r.custom_nodes),
            f"{r.export_s:.1f}",
            f"{r.max_abs_err:.1e}",
            f"{r.torch_ms:.2f}",
            f"{r.ort_ms:.2f}",
            f"{r.speedup:.2f}x",
            "pass" if r.passed else "FAIL",
        )
        for r in rows
    ]
    notes = [
        f"times: median of {ITERATIONS} interleaved runs after {WARMUP} warm-up, batch {TIMING_SHAPE[0]} x "
        f"{TIMING_SHAPE[1]} tokens, {TIMING_THREADS} thread each; speed-up = PyTorch ms / ORT ms "
        "(the ORT graph is the optimised one)",
        "parity: both ONNX files against PyTorch at three dynamic shapes, fp32 tolerance",
    ]
    notes += [note for mark, note in (("*", LOWERED_NOTE), ("+", MASK_NOTE)) if mark in marks]
    return "\n".join([aligned(header, cells), "", *notes])


def rows_json(rows: list[DemoRow]) -> list[dict]:
    return [{**asdict(r), "speedup": r.speedup} for r in rows]
