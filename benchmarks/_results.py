"""What every benchmark script shares: the machine's name and RESULTS.md section writing."""

from __future__ import annotations

import platform
import re
import subprocess
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def cpu_model() -> str:
    """The CPU's model name (lscpu), for the machine line of a results section."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        match = re.search(r"Model name:\s*(.+)", out)
        if match:
            return match.group(1).strip()
    except FileNotFoundError:
        pass
    return platform.processor() or "unknown CPU"


def replace_section(header: str, text: str) -> None:
    """Replace (or append) the ``header`` section of RESULTS.md, leaving the others alone."""
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(header)}\n.*?(?=^## |\Z)", re.S | re.M)
    block = text.rstrip() + "\n\n"
    new = pattern.sub(lambda _: block, old) if pattern.search(old) else old.rstrip() + "\n\n" + block
    RESULTS.write_text(new)
