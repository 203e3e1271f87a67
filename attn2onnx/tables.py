"""Aligned plain-text tables for human output (JSON stays the machines' format).

Columns are as wide as their widest cell; a column whose every cell is a number (``1,024``,
``-3.5e-07``, ``1.9x``, ``12%``) or a placeholder (``-``, ``?``) is right-aligned, text left-aligned.
Headers are words a user reads, not field names."""

from __future__ import annotations

import re
from typing import Sequence

_NUMBER = re.compile(r"[-+]?(\d[\d,]*)?\.?\d+(e[-+]?\d+)?[x%*+]?|[-?]", re.IGNORECASE)


def is_number(cell: str) -> bool:
    """A cell that reads as a number (or the ``-`` / ``?`` of a missing one)."""
    return bool(_NUMBER.fullmatch(cell.strip()))


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], *, indent: str = "", gap: str = "  ") -> str:
    """``header`` and ``rows`` (cells as strings) as aligned lines, numbers right-aligned."""
    lines = [list(header), *(list(row) for row in rows)]
    if any(len(line) != len(header) for line in lines):
        raise ValueError("every row needs one cell per header")
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    right = [bool(rows) and all(is_number(row[i]) for row in rows) for i in range(len(header))]
    out = []
    for line in lines:
        cells = [cell.rjust(w) if r else cell.ljust(w) for cell, w, r in zip(line, widths, right)]
        out.append((indent + gap.join(cells)).rstrip())
    return "\n".join(out)
