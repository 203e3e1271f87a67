"""Peak memory of one ``attn2onnx`` command, as the command's own process measured it.

A child's ``ru_maxrss`` (``os.wait4``, ``getrusage(RUSAGE_CHILDREN)``) is no use here: Linux
carries the high-water mark across ``exec``, and the child starts as a fork (or vfork) of its
parent, so the figure is at least the parent's resident size when it started the child (a test
runner holding torch, a benchmark holding the model it just built). The child below runs the
command in-process and reports its own ``VmHWM`` (Linux /proc) on its last stderr line.
"""

from __future__ import annotations

import os
import subprocess
import sys

_CHILD = """\
import sys
from attn2onnx.cli import main
code = main(sys.argv[1:])
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(f"peak_rss {int(hwm.split()[1]) * 1024}", file=sys.stderr)
sys.exit(code)
"""


def available() -> bool:
    """Whether this system reports a process's peak resident size in /proc (Linux)."""
    return os.path.exists("/proc/self/status")


def cli_peak_rss(args: list[str], env: dict[str, str] | None = None) -> tuple[int, int, str]:
    """Run ``attn2onnx ARGS`` in a fresh interpreter; its exit status, peak resident bytes and
    stderr (without the peak line)."""
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    lines = done.stderr.rstrip("\n").splitlines()
    peak = int(lines.pop().split()[1]) if lines and lines[-1].startswith("peak_rss ") else 0
    return done.returncode, peak, "\n".join(lines)
