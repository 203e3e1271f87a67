"""The few hostile cases that need the real ``attn2onnx`` process: stdin held open on a pipe
(a command reading its model from stdin would wait forever), payloads that must not run
through the installed entry point, and SIGTERM / SIGINT while ``new`` / ``export`` write.

Each pays torch's import (seconds): keep this file short."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from . import generators as gen
from .harness import ERROR_PREFIX, EXIT_USAGE, snapshot

TIMEOUT_S = 180.0


def command() -> list[str]:
    """The installed entry point, or ``python -m attn2onnx`` where it is not on PATH."""
    exe = shutil.which("attn2onnx")
    return [exe] if exe else [sys.executable, "-m", "attn2onnx"]


def start(argv: list[str], logs: Path) -> tuple[subprocess.Popen, Path, Path]:
    """``attn2onnx ARGV`` with stdin on an open pipe and output to files in ``logs``."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("ATTN2ONNX_DEBUG", None)
    logs.mkdir(exist_ok=True)
    out, err = logs / "stdout", logs / "stderr"
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen([*command(), *argv], stdin=subprocess.PIPE, stdout=o, stderr=e, env=env)
    return proc, out, err


def finish(proc: subprocess.Popen, timeout: float = TIMEOUT_S) -> int | None:
    """The exit status, or None when the process had to be killed after ``timeout``."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None
    finally:
        proc.stdin.close()


def assert_contract(status: int | None, stderr: str, ws: gen.Workspace, before: dict[str, str]) -> None:
    assert status is not None, "still waiting after the timeout (stdin was an open pipe)"
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert status == EXIT_USAGE and len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), (status, stderr)
    assert not ws.marker.exists(), "a payload ran: marker file created"
    assert snapshot(ws.root) == before, "files created, changed or removed"


def run_case(make, sources: gen.Sources, tmp_path: Path) -> None:
    ws = gen.Workspace(tmp_path / "case", sources)
    ws.root.mkdir()
    argv = make(ws)
    before = snapshot(ws.root)
    proc, _, err = start(argv, tmp_path / "logs")
    status = finish(proc)
    assert_contract(status, err.read_text(errors="replace"), ws, before)


STDIN_CASES = {
    "run-model": lambda ws: ["run", "/dev/stdin", "-o", ws.output("out.npz")],
    "export-model": lambda ws: ["export", "/dev/stdin", "-o", ws.output("out.onnx"), "--no-check"],
    "validate-reference": lambda ws: ["validate", ws.copy(ws.sources.onnx), "--reference", "/dev/stdin"],
}
MARKER_CASES = {
    "export-torch-zip-os-system": lambda ws: ["export", ws.write("payload.pt", gen.torch_bytes(
        gen.payload("os-system", ws.marker))), "-o", ws.output("out.onnx"), "--no-check"],
    "export-pt2-sample-inputs": lambda ws: program_case("sample-inputs/os-system/export").make(ws),
}


def program_case(name: str) -> gen.Case:
    return next(c for c in gen.program_payload_cases() if c.name == name)


@pytest.mark.parametrize("name", list(STDIN_CASES))
def test_stdin_pipe_is_never_read(name, sources, tmp_path):
    run_case(STDIN_CASES[name], sources, tmp_path)


@pytest.mark.parametrize("name", list(MARKER_CASES))
def test_payload_never_runs_in_the_real_command(name, sources, tmp_path):
    run_case(MARKER_CASES[name], sources, tmp_path)


# --- signals while writing ---------------------------------------------------------------------
def big_new(ws: gen.Workspace, out: str) -> list[str]:
    """A checkpoint of ~40 M parameters (~160 MB): its write lasts long enough to interrupt."""
    return ["new", "dcmha", "-o", out, "--layers", "4", "--d-model", "512", "--heads", "8", "--vocab-size", "50000"]


def medium_export(ws: gen.Workspace, out: str) -> list[str]:
    """Export of a model with a 32 MB embedding (made in-process: no extra subprocess)."""
    from attn2onnx import cli

    checkpoint = ws.path("medium.pt")
    assert cli.main(["new", "mha", "-o", checkpoint, "--layers", "1", "--d-model", "256", "--heads", "4",
                     "--vocab-size", "32000"]) == 0
    return ["export", checkpoint, "-o", out, "--no-check"]


WRITERS = {"new": big_new, "export": medium_export}


def wait_for_new_entry(proc: subprocess.Popen, folder: Path, known: set[str], timeout: float) -> bool:
    """Poll until something appears in ``folder`` (the writer's temporary) or the process ends."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if set(os.listdir(folder)) - known:
            return True
        time.sleep(0.001)
    return False


@pytest.mark.parametrize("writer", [pytest.param(w, marks=[pytest.mark.slow] if w == "export" else [])
                                    for w in WRITERS])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_mid_write_keeps_the_old_file(writer, sig, sources, tmp_path):
    """A signal while the output is being written: the old file stays byte for byte, no
    temporary is left, no traceback, and the process ends."""
    ws = gen.Workspace(tmp_path / "case", sources)
    ws.root.mkdir()
    out = ws.output("out" + (".pt" if writer == "new" else ".onnx"))
    argv = WRITERS[writer](ws, out)
    before = snapshot(ws.root)
    proc, _, err = start(argv, tmp_path / "logs")
    caught = wait_for_new_entry(proc, ws.root, set(before), TIMEOUT_S)
    if caught:
        proc.send_signal(sig)
    status = finish(proc)
    assert caught, f"the write ended before it could be interrupted (exit {status}): make the model bigger"
    stderr = err.read_text(errors="replace")
    assert status is not None, "still running after the signal"
    assert status != 0, "the command reported success although it was interrupted"
    assert "Traceback" not in stderr, stderr
    assert snapshot(ws.root) == before, "the old output changed or a temporary file was left behind"
