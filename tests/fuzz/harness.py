"""Running one hostile case and checking the error contract.

A case runs ``attn2onnx.cli.main(argv)`` in a forked child of the test process: the same code
path as the command, without paying torch's import again (a fork costs milliseconds), while a
hang, a crash in a native kernel or an allocation gone wild stays in the child. The child gets
stdin from an open pipe (a command that reads stdin would wait forever: the timeout reports
it), its own stdout / stderr files, the CLI's warning behaviour (not pytest's) and an address
space limit, and leaves the test process' state (cwd, env, torch globals) untouched.

The contract (README, "Errors a user can fix"): exit status 2, exactly one stderr line
``attn2onnx: error: ...``, no traceback, no file created, changed or left behind in the case
folder (pre-existing outputs byte-identical, no temporaries), no marker file from a payload.
"""

from __future__ import annotations

import hashlib
import os
import resource
import signal
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

ERROR_PREFIX = "attn2onnx: error: "
EXIT_USAGE = 2
# Extra address space a case may take beyond the test process' own (an honest error for a
# huge size must come long before this; the limit only keeps a runaway case off the machine).
EXTRA_ADDRESS_SPACE = 4 << 30


@dataclass(frozen=True)
class Outcome:
    """What one run did: exit status (None when killed by a signal or the timeout)."""

    status: int | None
    signal: int | None
    timed_out: bool
    stdout: str
    stderr: str
    seconds: float

    def describe(self) -> str:
        """One readable line of what happened, for failure messages and the report."""
        if self.timed_out:
            head = f"still running after {self.seconds:.0f} s (killed)"
        elif self.signal is not None:
            head = f"died of signal {signal.Signals(self.signal).name}"
        else:
            head = f"exit {self.status}"
        lines = self.stderr.strip().splitlines()
        tail = f"; stderr ({len(lines)} lines) ends: {lines[-1][:300]!r}" if lines else "; stderr empty"
        return head + tail


def _cli_warnings() -> None:
    """The warning filters and printing of a plain ``python`` process (pytest changes both)."""
    warnings.resetwarnings()
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
        warnings.simplefilter("ignore", category)

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001 - warnings' signature
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    warnings.showwarning = show


def _limit_address_space() -> None:
    """Cap the child's address space at its current size plus EXTRA_ADDRESS_SPACE."""
    with open("/proc/self/status") as f:
        size_kb = next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))
    limit = size_kb * 1024 + EXTRA_ADDRESS_SPACE
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _child(argv: Sequence[str], cwd: Path, stdin_fd: int, out_fd: int, err_fd: int) -> None:
    """Body of the forked child: never returns (os._exit skips pytest's teardown)."""
    status = 1
    try:
        os.setpgid(0, 0)
        os.dup2(stdin_fd, 0)
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the child's whole life
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
        os.chdir(cwd)
        os.environ.pop("ATTN2ONNX_DEBUG", None)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _cli_warnings()
        _limit_address_space()
        from attn2onnx import cli

        try:
            result = cli.main(list(argv))
            status = int(result or 0)
        except SystemExit as exit_:  # argparse errors, as the real command exits
            if isinstance(exit_.code, str):
                print(exit_.code, file=sys.stderr)
                status = 1
            else:
                status = int(exit_.code or 0)
    except BaseException:  # noqa: BLE001 - what the interpreter does with an uncaught exception
        traceback.print_exc()
        status = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - nothing left to report it to
                pass
        os._exit(status & 0xFF)


def run_forked(argv: Sequence[str], cwd: Path, timeout: float) -> Outcome:
    """``attn2onnx ARGV`` via cli.main in a forked child (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="attn2onnx-fuzz-io-") as io_dir:
        out_path, err_path = Path(io_dir, "stdout"), Path(io_dir, "stderr")
        stdin_r, stdin_w = os.pipe()
        out_fd = os.open(out_path, os.O_WRONLY | os.O_CREAT)
        err_fd = os.open(err_path, os.O_WRONLY | os.O_CREAT)
        sys.stdout.flush()
        sys.stderr.flush()
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            _child(argv, cwd, stdin_r, out_fd, err_fd)
        for fd in (stdin_r, out_fd, err_fd):
            os.close(fd)
        try:
            wait_status, timed_out = _wait(pid, start + timeout)
        finally:
            os.close(stdin_w)  # stdin stays open (a reader would block) until the child is gone
        seconds = time.monotonic() - start
        out = out_path.read_text(errors="replace")
        err = err_path.read_text(errors="replace")
    if timed_out:
        return Outcome(None, None, True, out, err, seconds)
    if os.WIFSIGNALED(wait_status):
        return Outcome(None, os.WTERMSIG(wait_status), False, out, err, seconds)
    return Outcome(os.WEXITSTATUS(wait_status), None, False, out, err, seconds)


def _wait(pid: int, deadline: float) -> tuple[int, bool]:
    """Wait for the child until ``deadline``; then kill its process group. (status, timed out)"""
    delay = 0.002
    while True:
        done, wait_status = os.waitpid(pid, os.WNOHANG)
        if done:
            return wait_status, False
        if time.monotonic() > deadline:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _, wait_status = os.waitpid(pid, 0)
            return wait_status, True
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def snapshot(root: Path) -> dict[str, str]:
    """Relative path -> content digest (or link target / folder) of everything under ``root``."""
    state: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = str(path.relative_to(root))
            if path.is_symlink():
                state[rel] = "link:" + os.readlink(path)
            elif path.is_dir():
                state[rel] = "folder"
            elif path.is_file():
                state[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                state[rel] = "special"
    return state


def contract_problems(outcome: Outcome, before: dict[str, str], after: dict[str, str], marker: Path) -> list[str]:
    """Every way ``outcome`` and the folder's change break the error contract (empty: kept)."""
    problems = []
    if outcome.timed_out:
        problems.append("hang: no exit before the timeout (stdin was an open pipe)")
    elif outcome.signal is not None:
        problems.append(f"crash: killed by {signal.Signals(outcome.signal).name}")
    elif outcome.status != EXIT_USAGE:
        problems.append(f"exit status {outcome.status}, expected {EXIT_USAGE}")
    if "Traceback" in outcome.stderr:
        problems.append("traceback on stderr")
    lines = outcome.stderr.strip().splitlines()
    if len(lines) != 1 or not lines[0].startswith(ERROR_PREFIX):
        problems.append(f"stderr is not one '{ERROR_PREFIX}...' line ({len(lines)} lines)")
    if marker.exists():
        problems.append("a payload ran: marker file created")
    changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
    if changed:
        problems.append(f"files created, changed or removed: {changed[:6]}")
    return problems
