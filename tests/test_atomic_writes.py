"""Every output goes through one atomic writer (attn2onnx.fileio.atomic_output): a failed or
interrupted write never touches the old file, an output that is one of the inputs is refused
before any work, new files get the mode a plain open() would give them, and an ONNX model and
its ``.data`` file are replaced together (issue 11, item 4)."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest

import attn2onnx
import attn2onnx.onnx_io as onnx_io
from attn2onnx.errors import UsageError
from attn2onnx.exporter import export
from attn2onnx.fileio import atomic_output
from attn2onnx.models import ModelConfig, build_model
from attn2onnx.passes import optimize, pipeline
from attn2onnx.sources import from_module
from test_cli_basic import assert_one_line_error, call

CONFIG = ModelConfig(family="layer", variant="dcmha", d_model=16, heads=2, max_len=32)


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny checkpoint and its export, made once; tests copy them before writing anywhere."""
    folder = tmp_path_factory.mktemp("atomic")
    model = build_model(CONFIG)
    ckpt = attn2onnx.save(model, folder / "m.pt")
    source = from_module(model)
    result = export(
        model,
        source.example_inputs(1, 4),
        folder / "m.onnx",
        specs=source.specs,
        output_names=source.output_names,
        max_seq=source.max_seq,
    )
    return ckpt, result.path


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every entry under ``folder`` (temporaries included), by relative path -> its bytes (b"" for
    a folder)."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"" for p in folder.rglob("*")}


def _copy(src: Path, dest: Path) -> Path:
    dest.write_bytes(src.read_bytes())
    return dest


# --- a failed export keeps the old file -------------------------------------------------------
def test_failed_export_keeps_the_existing_model_and_data(tmp_path):
    """opset 5 exports a model onnx.checker rejects: the old keep.onnx and keep.onnx.data stay
    as they were and no temporary is left (the model used to be written first, then deleted)."""
    (tmp_path / "keep.onnx").write_bytes(b"old model")
    (tmp_path / "keep.onnx.data").write_bytes(b"old data")
    before = _snapshot(tmp_path)
    model = build_model(CONFIG)
    source = from_module(model)
    with pytest.raises(onnx.checker.ValidationError):
        export(
            model,
            source.example_inputs(1, 4),
            tmp_path / "keep.onnx",
            specs=source.specs,
            output_names=source.output_names,
            opset=5,
        )
    assert _snapshot(tmp_path) == before


def test_failed_check_keeps_model_and_data(made, tmp_path, monkeypatch):
    """save_model writes the model and its .data to temporaries, checks them there, and only then
    renames both: a failing check leaves the old pair untouched; a passing one replaces both."""
    _, model_path = made
    monkeypatch.setattr(onnx_io, "PROTOBUF_LIMIT", 0)
    (tmp_path / "m.onnx").write_bytes(b"old model")
    (tmp_path / "m.onnx.data").write_bytes(b"old data")
    before = _snapshot(tmp_path)
    proto = onnx.load(str(model_path))

    def reject(path: Path) -> None:
        assert (path.parent / "m.onnx.data").is_file()  # the check sees the new data beside the model
        raise RuntimeError("rejected")

    with pytest.raises(RuntimeError, match="rejected"):
        onnx_io.save_model(proto, tmp_path / "m.onnx", check=reject)
    assert _snapshot(tmp_path) == before
    onnx_io.save_model(proto, tmp_path / "m.onnx", check=onnx_io.check_model)
    assert sorted(_snapshot(tmp_path)) == ["m.onnx", "m.onnx.data"]
    assert (tmp_path / "m.onnx.data").read_bytes() != b"old data"
    onnx_io.check_model(tmp_path / "m.onnx")


# --- an output that is one of the inputs is refused before any work ---------------------------
def _same_file_cases(tmp_path: Path, ckpt: Path, model: Path) -> dict[str, list[str]]:
    """Command lines whose output is one of their inputs, by a path, a symlink or <out>.data."""
    onnx_path = _copy(model, tmp_path / "m.onnx")
    pt = _copy(ckpt, tmp_path / "m.pt")
    np.savez(tmp_path / "in.npz", x=np.zeros((1, 4, CONFIG.d_model), np.float32))
    os.symlink(onnx_path, tmp_path / "link.onnx")
    os.symlink(pt, tmp_path / "pt-link.onnx")
    os.symlink(onnx_path, tmp_path / "other.onnx.data")
    ext = tmp_path / "ext"
    ext.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(onnx_io, "PROTOBUF_LIMIT", 0)
        onnx_io.save_model(onnx.load(str(model)), ext / "e.onnx")
    (tmp_path / "release").mkdir()
    (tmp_path / "release" / "pytorch_model.bin").write_bytes(b"released weights")
    t = str(tmp_path)
    return {
        "run -o MODEL": ["run", f"{t}/m.onnx", "-o", f"{t}/m.onnx"],
        "run -o symlink to MODEL": ["run", f"{t}/m.onnx", "-o", f"{t}/link.onnx"],
        "run --inputs IN -o IN": ["run", f"{t}/m.onnx", "--inputs", f"{t}/in.npz", "-o", f"{t}/in.npz"],
        "run -o MODEL.data": ["run", f"{ext}/e.onnx", "-o", f"{ext}/e.onnx.data"],
        "optimize -o MODEL": ["optimize", f"{t}/m.onnx", "-o", f"{t}/m.onnx"],
        "optimize -o symlink to MODEL": ["optimize", f"{t}/m.onnx", "-o", f"{t}/link.onnx"],
        "optimize, OUT.data is MODEL": ["optimize", f"{t}/m.onnx", "-o", f"{t}/other.onnx"],
        "export -o symlink to CKPT": ["export", f"{t}/m.pt", "-o", f"{t}/pt-link.onnx"],
        "convert -o a file of DIR": ["convert", f"{t}/release", "-o", f"{t}/release/pytorch_model.bin"],
    }


CASES = [
    "run -o MODEL",
    "run -o symlink to MODEL",
    "run --inputs IN -o IN",
    "run -o MODEL.data",
    "optimize -o MODEL",
    "optimize -o symlink to MODEL",
    "optimize, OUT.data is MODEL",
    "export -o symlink to CKPT",
    "convert -o a file of DIR",
]


@pytest.mark.parametrize("case", CASES)
def test_commands_refuse_an_output_that_is_an_input(made, tmp_path, capsys, case):
    """One line, exit 2, nothing printed, every file as it was (run used to write its npz over
    the model)."""
    argv = _same_file_cases(tmp_path, *made)[case]
    before = _snapshot(tmp_path)
    status, out, err = call(capsys, *argv)
    assert status == 2 and out == "", (out, err)
    assert_one_line_error(err, "same file")
    assert _snapshot(tmp_path) == before


def test_atomic_output_refuses_an_input(tmp_path):
    """The primitive itself refuses, through a symlink too, before creating anything."""
    source = tmp_path / "in.bin"
    source.write_bytes(b"input")
    os.symlink(source, tmp_path / "alias.bin")
    for out in (source, tmp_path / "alias.bin"):
        with pytest.raises(UsageError, match="same file"):
            with atomic_output(out, inputs=[source]):
                pytest.fail("atomic_output yielded for an output that is an input")
    assert sorted(_snapshot(tmp_path)) == ["alias.bin", "in.bin"] and source.read_bytes() == b"input"


def test_writing_through_a_symlink_replaces_its_target(tmp_path):
    """As open() would: the link stays a link, its target gets the new bytes (and no temporary
    is left in either folder)."""
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "m.pt"
    target.write_bytes(b"old")
    os.symlink(target, tmp_path / "link.pt")
    with atomic_output(tmp_path / "link.pt") as tmp:
        tmp.write_bytes(b"new")
    assert (tmp_path / "link.pt").is_symlink() and target.read_bytes() == b"new"
    assert sorted(_snapshot(tmp_path)) == ["link.pt", "real", "real/m.pt"]


# --- signals ---------------------------------------------------------------------------------
# `attn2onnx new` whose torch.save writes part of the checkpoint, says so, then hangs.
SLOW_NEW = """
import signal, sys, time
import torch
signal.signal(signal.SIGINT, signal.default_int_handler)  # even where the parent ignores SIGINT

def slow_save(obj, f, *args, **kwargs):
    f.write(b"partial")
    f.flush()
    print("writing", flush=True)
    time.sleep(120)

torch.save = slow_save
from attn2onnx.cli import main
sys.exit(main(["new", "mha", "-o", sys.argv[1]]))
"""


@pytest.mark.parametrize(
    "signum, statuses", [(signal.SIGTERM, (-signal.SIGTERM, 143)), (signal.SIGINT, (-signal.SIGINT, 130))]
)
def test_a_signal_mid_write_removes_the_temporary(tmp_path, signum, statuses):
    """SIGTERM / SIGINT while `new` writes: the old checkpoint stays, no temporary is left, and
    the process ends the conventional way (killed by the signal, or 143 / 130)."""
    out = tmp_path / "m.pt"
    out.write_bytes(b"old checkpoint")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_NEW, str(out)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 180)
        assert ready and proc.stdout.readline() == b"writing\n", proc.stderr.read1()
        assert len(list(tmp_path.iterdir())) > 1  # the temporary exists while writing
        proc.send_signal(signum)
        status = proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert status in statuses, proc.stderr.read()
    assert _snapshot(tmp_path) == {"m.pt": b"old checkpoint"}


def test_signal_handlers_only_while_writing_and_only_in_the_main_thread(tmp_path):
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)}
    with atomic_output(tmp_path / "a.bin") as tmp:
        assert all(signal.getsignal(s) is not h for s, h in previous.items())
        tmp.write_bytes(b"a")
    assert {s: signal.getsignal(s) for s in previous} == previous
    errors: list[BaseException] = []

    def write_in_a_thread() -> None:
        try:
            with atomic_output(tmp_path / "b.bin") as tmp:
                assert {s: signal.getsignal(s) for s in previous} == previous
                tmp.write_bytes(b"b")
        except BaseException as e:  # noqa: BLE001 - reported to the main thread
            errors.append(e)

    thread = threading.Thread(target=write_in_a_thread)
    thread.start()
    thread.join(timeout=60)
    assert not errors and (tmp_path / "b.bin").read_bytes() == b"b"
    assert sorted(_snapshot(tmp_path)) == ["a.bin", "b.bin"]


# --- file modes ------------------------------------------------------------------------------
@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_outputs_get_the_mode_open_would_give(made, tmp_path, capsys, umask, monkeypatch):
    """.pt, .npz, .onnx and .onnx.data: 0666 & ~umask (mkstemp's 0600 used to leak through)."""
    ckpt, model = made
    want = 0o666 & ~umask
    attn2onnx.save(attn2onnx.load(ckpt), tmp_path / "m.pt")
    status, _, err = call(capsys, "run", str(model), "--seq-len", "4", "-o", str(tmp_path / "out.npz"))
    assert status == 0, err
    monkeypatch.setattr(onnx_io, "PROTOBUF_LIMIT", 0)
    onnx_io.save_model(onnx.load(str(model)), tmp_path / "m.onnx")
    modes = {p.name: _mode(p) for p in tmp_path.iterdir()}
    assert modes == dict.fromkeys(["m.pt", "out.npz", "m.onnx", "m.onnx.data"], want)


# --- one external-data threshold -------------------------------------------------------------
def test_optimize_uses_the_one_external_data_threshold(made, tmp_path, monkeypatch):
    """passes.pipeline writes through onnx_io.save_model: lowering onnx_io's threshold moves the
    weights of an optimized model to <out>.data (pipeline used to count against its own limit)."""
    _, model = made
    assert not hasattr(pipeline, "PROTO_LIMIT")
    monkeypatch.setattr(onnx_io, "PROTOBUF_LIMIT", 0)
    optimize(model, tmp_path / "o.onnx", target="portable")
    assert sorted(_snapshot(tmp_path)) == ["o.onnx", "o.onnx.data"]
    onnx_io.check_model(tmp_path / "o.onnx")
