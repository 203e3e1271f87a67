"""List the attention variants attn2onnx supports: the paper each comes from, whether it can
be causal, its parameter count per layer (biases excluded) and the model families it fits.
Read from the variants' torch-free listing (attn2onnx.variants.LISTINGS): no torch import."""

from __future__ import annotations

import argparse

HELP = "list the attention variants"


def configure(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def table(rows: list[tuple[str, ...]]) -> str:
    """Left-aligned columns separated by two spaces, with a rule under the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ..variants import LISTINGS

    rows = [("variant", "paper", "causal", "params / layer (no biases)", "families")]
    for name, info in LISTINGS.items():
        rows.append((name, info.paper, "yes" if info.causal else "no", info.params, ", ".join(info.families)))
    print(table(rows))
    return 0
