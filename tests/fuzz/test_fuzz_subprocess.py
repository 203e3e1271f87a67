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
    "export-torch-zip-os-system": lambda ws: [
        "export",
        ws.write("payload.pt", gen.torch_bytes(gen.payload("os-system", ws.marker))),
        "-o",
        ws.output("out.onnx"),
        "--no-check",
    ],
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
    assert (
        cli.main(
            [
                "new",
                "mha",
                "-o",
                checkpoint,
                "--layers",
                "1",
                "--d-model",
                "256",
                "--heads",
                "4",
                "--vocab-size",
                "32000",
            ]
        )
        == 0
    )
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


def is_complete(path: Path) -> bool:
    """Whether ``path`` is a whole output as the writer makes it: a checkpoint whose every zip
    entry matches its CRC (the loader policy), or an ONNX model onnx.checker accepts."""
    import onnx

    from attn2onnx.checkpoint import read_checkpoint

    try:
        read_checkpoint(path) if path.suffix == ".pt" else onnx.checker.check_model(str(path))
    except Exception:  # noqa: BLE001 - any failure to read it back means a damaged file
        return False
    return True


def interrupt_write(writer: str, sig: signal.Signals, sources: gen.Sources, folder: Path) -> bool:
    """One try: start the writer, send ``sig`` as soon as its temporary appears and check what
    must hold however late the signal lands (no traceback, an end, no temporary left, the
    destination either the old file byte for byte or the complete new one). True when the
    signal interrupted the write (old file kept, failure status); False when it came too late
    (the process had already written the new file, or ended, before the signal)."""
    ws = gen.Workspace(folder / "case", sources)
    ws.root.mkdir(parents=True)
    out = ws.output("out" + (".pt" if writer == "new" else ".onnx"))
    argv = WRITERS[writer](ws, out)
    before = snapshot(ws.root)
    proc, _, err = start(argv, folder / "logs")
    caught = wait_for_new_entry(proc, ws.root, set(before), TIMEOUT_S)
    if caught:
        proc.send_signal(sig)
    status = finish(proc)
    stderr = err.read_text(errors="replace")
    after = snapshot(ws.root)
    assert status is not None, "still running after the signal"
    assert "Traceback" not in stderr, stderr
    assert set(after) == set(before), f"files created or removed (a temporary left?): {set(after) ^ set(before)}"
    if after == before:
        assert caught, f"the command ended (exit {status}) before any signal without writing: {stderr[-300:]}"
        assert status != 0, "the command reported success but left the old output in place"
        return True
    name = Path(out).name
    changed = sorted(p for p in after if after[p] != before[p])
    assert changed == [name], f"files other than the output changed: {changed}"
    assert is_complete(Path(out)), "the output was replaced by a partial file"
    return False


TRIES = 3


@pytest.mark.parametrize(
    "writer", [pytest.param(w, marks=[pytest.mark.slow] if w == "export" else []) for w in WRITERS]
)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_mid_write_keeps_the_old_file(writer, sig, sources, tmp_path):
    """A signal while the output is being written keeps the old file byte for byte, leaves no
    temporary and no traceback, and the process fails. The test cannot aim the signal exactly
    (a busy machine may deschedule it until the writer has renamed its file): a try where the
    signal came too late must still leave a complete file, and is repeated; the test fails
    unless one of TRIES tries interrupts the write."""
    for attempt in range(TRIES):
        if interrupt_write(writer, sig, sources, tmp_path / f"try{attempt}"):
            return
    pytest.fail(
        f"in none of {TRIES} tries did the signal stop the write: the new file replaced the old one each "
        "time (the writer ignores the signal, or finishes too fast to interrupt: make the model bigger)"
    )
