"""The main job: for every variant, build a small model in a family it fits, export it, run it
in ONNX Runtime, validate it against PyTorch at several dynamic shapes, and time both."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

TIMING_SHAPE = (1, 64)


@dataclass
class DemoRow:
    variant: str
    family: str
    nodes: int
    optimized_nodes: int
    custom_nodes: int
    export_s: float
    max_abs_err: float
    ort_ms: float
    torch_ms: float
    passed: bool


def median_ms(fn: Callable[[], object], repeats: int = 10) -> float:
    """Median wall time of ``fn`` in milliseconds after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def demo_variant(name: str, out_dir: Path) -> DemoRow:
    """Export, optimise (ort target), validate and time one variant's demo model."""
    from .exporter import export
    from .passes import optimize
    from .io_spec import random_inputs
    from .models import ModelConfig, build_model
    from .runtime import session
    from .sources import from_module
    from .validate import check_parity
    from .variants import get_variant

    family = "lm" if get_variant(name).causal else "encoder"
    model = build_model(ModelConfig(family=family, variant=name, layers=2, d_model=64, heads=4, max_len=128, seed=0))
    source = from_module(model)
    result = export(
        model,
        source.example_inputs(2, 16),
        out_dir / f"{name}.onnx",
        specs=source.specs,
        output_names=source.output_names,
        max_seq=source.max_seq,
    )
    optimized = out_dir / f"{name}.opt.onnx"
    report = optimize(result.path, optimized, target="ort")
    comparisons = [c for path in (result.path, optimized) for c in check_parity(path, source).comparisons]
    feeds = random_inputs(source.specs, *TIMING_SHAPE, seed=1)
    sess = session(str(optimized))
    args = [torch.from_numpy(feeds[s.name]) for s in source.specs]
    with torch.inference_mode():
        torch_ms = median_ms(lambda: model(*args))
    ort_ms = median_ms(lambda: sess.run(None, feeds))
    return DemoRow(
        name,
        family,
        result.nodes,
        report.after.nodes,
        result.custom_nodes,
        result.seconds,
        max(c.max_abs_err for c in comparisons),
        ort_ms,
        torch_ms,
        all(c.passed for c in comparisons),
    )


def run_demo(
    out_dir: Path, variants: list[str] | None = None, progress: Callable[[str], None] = lambda s: None
) -> list[DemoRow]:
    """Demo rows for ``variants`` (default: every registered variant)."""
    from .variants import VARIANTS

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in variants or list(VARIANTS):
        progress(name)
        rows.append(demo_variant(name, out_dir))
    return rows


def format_table(rows: list[DemoRow]) -> str:
    """The demo's table, one row per variant."""
    header = (
        "variant",
        "family",
        "nodes",
        "optimised",
        "custom",
        "export s",
        "max err",
        "ORT ms",
        "PyTorch ms",
        "passed",
    )
    lines = [header] + [
        (
            r.variant,
            r.family,
            str(r.nodes),
            str(r.optimized_nodes),
            str(r.custom_nodes),
            f"{r.export_s:.1f}",
            f"{r.max_abs_err:.1e}",
            f"{r.ort_ms:.2f}",
            f"{r.torch_ms:.2f}",
            "yes" if r.passed else "NO",
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)) for line in lines)


def rows_json(rows: list[DemoRow]) -> list[dict]:
    return [asdict(r) for r in rows]
