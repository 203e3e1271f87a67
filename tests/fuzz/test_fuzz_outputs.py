"""Every writing command against destinations it must not destroy (issue 19, items 2-5), through
``attn2onnx.cli.main`` in forked children (see harness):

- special-output: a socket, a block device or a FIFO nobody reads is refused (exit 2, one
  line, nothing changed, no hang); a FIFO with a reader or a character device is written
  through and stays what it was;
- output-mode: rewriting a 0600 output keeps it 0600;
- output-kill: the temporary folder of a killed writer is swept by the next command writing
  there; an output name of 255 bytes works;
- output-race: two processes saving models with external data to one destination, round
  after round: every model on disk reads its own weights.

Special files live in each case's folder (mknod needs root); the real /dev/null is never used.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import signal
import socket
import stat
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest

from . import generators as gen
from .harness import contract_problems, run_forked, snapshot
from special_files import TIMEOUT_S, FifoReader, mknod, slow_renames

WRITERS = ("new", "export", "optimize", "run")  # build-engine needs TensorRT before it writes


def _cases(kind: str, name: str, kinds: tuple[str, ...] = ("",)) -> list:
    """One param per writer (and per kind), ids ``<kind>:<writer>/<name>``. An export that gets
    as far as writing takes seconds: those are ``slow`` (sampled, see conftest)."""
    return [
        pytest.param(*((c, k) if k else (c,)), id=f"{kind}:{c}/{k or name}", marks=[pytest.mark.slow] * (c == "export"))
        for c in WRITERS
        for k in kinds
    ]


def _output(ws: gen.Workspace, command: str) -> Path:
    return ws.root / ("out" + gen.WRITER_SUFFIX[command])


def _socket(path: Path) -> None:
    """A unix socket's node (it stays after the socket is closed)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))


REFUSED: dict[str, Callable[[Path], None]] = {
    "socket": _socket,
    "block-device": lambda p: mknod(p, stat.S_IFBLK, 7, 0),  # a loop device, never opened
    "fifo-no-reader": os.mkfifo,
}


def _workspace(sources: gen.Sources, tmp_path: Path) -> gen.Workspace:
    ws = gen.Workspace(tmp_path / "case", sources)
    ws.root.mkdir()
    return ws


@pytest.mark.parametrize(
    "command, kind", [pytest.param(c, k, id=f"special-output:{c}/{k}") for c in WRITERS for k in REFUSED]
)
def test_a_special_destination_is_refused(command, kind, sources, tmp_path):
    """Before: renamed over (the socket, device or FIFO became a regular file), exit 0."""
    ws = _workspace(sources, tmp_path)
    out = _output(ws, command)
    REFUSED[kind](out)
    argv = gen.WRITERS[command](ws, str(out))
    before = snapshot(ws.root)
    outcome = run_forked(argv, ws.root, TIMEOUT_S)
    problems = contract_problems(outcome, before, snapshot(ws.root), ws.marker)
    assert not problems, f"{'; '.join(problems)}\n  argv: {argv}\n  observed: {outcome.describe()}"


def _parses(command: str, data: bytes) -> bool:
    """Whether ``data`` is a whole output of ``command`` (npz, ONNX model, checkpoint zip)."""
    if command == "run":
        return len(np.load(io.BytesIO(data))) > 0
    if command in ("export", "optimize"):
        return len(onnx.load_from_string(data).graph.node) > 0
    return data[:2] == b"PK"  # torch.save's zip archive


@pytest.mark.parametrize("command, kind", _cases("special-output", "", ("fifo-with-reader", "char-device")))
def test_a_fifo_or_character_device_is_written_through(command, kind, sources, tmp_path):
    """`-o /dev/null` (here a node of the null device) and `-o FIFO` with a reader: exit 0, the
    node stays a device / FIFO, a FIFO's reader gets the whole output."""
    ws = _workspace(sources, tmp_path)
    out = _output(ws, command)
    if kind == "char-device":
        mknod(out, stat.S_IFCHR, 1, 3)
        reader = None
    else:
        os.mkfifo(out)
        reader = FifoReader(out)
    outcome = run_forked(gen.WRITERS[command](ws, str(out)), ws.root, TIMEOUT_S)
    data = reader.result() if reader else b""
    assert outcome.status == 0, outcome.describe()
    is_kind = stat.S_ISCHR if kind == "char-device" else stat.S_ISFIFO
    assert is_kind(os.lstat(out).st_mode)
    assert reader is None or _parses(command, data)
    assert not [p for p in os.listdir(ws.root) if p.endswith(".tmp")]


@pytest.mark.parametrize(
    "kind, flags",
    [
        pytest.param(k, f, id=f"special-output:export/{k}{''.join(f) or '-checked'}")
        for k in ("char-device", "fifo-no-reader")
        for f in ((), ("--no-check", "--optimize"))
    ],
)
def test_export_refuses_a_device_it_must_read_back_before_exporting(kind, flags, sources, tmp_path):
    """export's check and --optimize read the written model back, which a pipe or device cannot
    give: refused before the export (it used to export, write through, then fail reading)."""
    ws = _workspace(sources, tmp_path)
    out = ws.root / "out.onnx"
    if kind == "char-device":
        mknod(out, stat.S_IFCHR, 1, 3)
    else:
        os.mkfifo(out)
    argv = ["export", ws.copy(ws.sources.checkpoint), "-o", str(out), *flags]
    before = snapshot(ws.root)
    outcome = run_forked(argv, ws.root, TIMEOUT_S)
    problems = contract_problems(outcome, before, snapshot(ws.root), ws.marker)
    assert not problems and "--no-check" in outcome.stderr, f"{'; '.join(problems)}\n  observed: {outcome.describe()}"


@pytest.mark.parametrize("command", _cases("output-mode", "0600"))
def test_rewriting_a_private_output_keeps_it_private(command, sources, tmp_path, umask_022):
    """Before: a 0600 output came back 0644."""
    ws = _workspace(sources, tmp_path)
    out = Path(ws.output(_output(ws, command).name))
    out.chmod(0o600)
    outcome = run_forked(gen.WRITERS[command](ws, str(out)), ws.root, TIMEOUT_S)
    assert outcome.status == 0, outcome.describe()
    assert out.read_bytes() != gen.SENTINEL and stat.S_IMODE(out.stat().st_mode) == 0o600


def _killed_writers_leftover(folder: Path) -> str:
    """What a writer killed by SIGKILL mid-write leaves in ``folder``: its temporary folder."""
    pid = os.fork()
    if pid == 0:
        try:
            from attn2onnx.fileio import atomic_output

            with atomic_output(folder / "killed.bin") as tmp:
                tmp.write_bytes(b"partial")
                os.kill(os.getpid(), signal.SIGKILL)
        finally:
            os._exit(1)
    os.waitpid(pid, 0)
    (left,) = os.listdir(folder)
    return left


@pytest.mark.parametrize("command", _cases("output-kill", "sweeps-dead-writer"))
def test_a_killed_writers_temporary_is_swept(command, sources, tmp_path):
    """Before: `.NAME.*.tmp/` folders of killed writers stayed for good."""
    ws = _workspace(sources, tmp_path)
    left = _killed_writers_leftover(ws.root)
    out = _output(ws, command)
    outcome = run_forked(gen.WRITERS[command](ws, str(out)), ws.root, TIMEOUT_S)
    assert outcome.status == 0, outcome.describe()
    assert left not in os.listdir(ws.root) and out.is_file()


@pytest.mark.parametrize("command", _cases("output-kill", "name-of-255-bytes"))
def test_an_output_name_of_255_bytes_works(command, sources, tmp_path):
    """Before: 'File name too long' from 243 bytes on (the temporary's name was longer)."""
    ws = _workspace(sources, tmp_path)
    suffix = gen.WRITER_SUFFIX[command]
    out = ws.root / ("o" * (255 - len(suffix)) + suffix)
    outcome = run_forked(gen.WRITERS[command](ws, str(out)), ws.root, TIMEOUT_S)
    assert outcome.status == 0, outcome.describe()
    assert out.is_file() and not [p for p in os.listdir(ws.root) if p.endswith(".tmp")]


# --- two writers, one destination -------------------------------------------------------------
def _weights_model(tag: str, value: float) -> onnx.ModelProto:
    """Y = W (256 floats, all ``value``); the tag and value in the metadata say whose it is."""
    w = onnx.numpy_helper.from_array(np.full(256, value, np.float32), "W")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["W"], ["Y"])],
        "g",
        [],
        [onnx.helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [256])],
        [w],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    onnx.helper.set_model_props(model, {"writer": tag, "value": repr(value)})
    return model


def _model_writer(out: Path, tag: str, rounds: int, start, done) -> None:  # noqa: ANN001 - barriers
    """Child: each round, save a model whose weights (in ``<out>.data``) hold its own value.
    Renames are slowed by a random pause (a busy file system) so the writers' renames interleave."""
    from attn2onnx import onnx_io

    onnx_io.PROTOBUF_LIMIT = 0  # weights to <out>.data
    slow_renames(tag)
    for r in range(rounds):
        start.wait(timeout=TIMEOUT_S)
        onnx_io.save_model(_weights_model(tag, float(r) + (0.25 if tag == "A" else 0.75)), out)
        done.wait(timeout=TIMEOUT_S)


@pytest.mark.parametrize("rounds", [pytest.param(25, id="output-race:save_model/two-writers")])
def test_two_writers_never_leave_a_model_with_the_others_weights(rounds, tmp_path):
    """Before: model and .data were renamed separately; a model often loaded the other writer's
    weights (same sizes: nothing failed, the weights were silently wrong)."""
    out = tmp_path / "m.onnx"
    ctx = multiprocessing.get_context("fork")
    start, done = ctx.Barrier(3), ctx.Barrier(3)
    writers = [ctx.Process(target=_model_writer, args=(out, tag, rounds, start, done)) for tag in "AB"]
    for w in writers:
        w.start()
    mixed = []
    try:
        for r in range(rounds):
            start.wait(timeout=TIMEOUT_S)
            done.wait(timeout=TIMEOUT_S)
            model = onnx.load(str(out))
            props = {p.key: p.value for p in model.metadata_props}
            weights = onnx.numpy_helper.to_array(model.graph.initializer[0])
            if not (weights == float(props["value"])).all():
                mixed.append((r, props["writer"], float(weights[0])))
    finally:
        for w in writers:
            w.join(timeout=TIMEOUT_S)
            w.kill()
    assert [w.exitcode for w in writers] == [0, 0]
    assert not mixed, f"{len(mixed)} of {rounds} rounds: a model beside another write's weights: {mixed[:3]}"
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]
