"""Outputs never destroy what they replace (issue 19, items 2-5), checked on
attn2onnx.fileio.atomic_output directly (fast; the commands all write through it, see
tests/fuzz/test_fuzz_outputs.py for the command-line cases):

- a destination that is no regular file is written through (a FIFO with a reader, a character
  device such as /dev/null) or refused in one line (a FIFO nobody reads, a block device, a
  socket), never renamed over;
- a rewritten file keeps its mode, owner and extended attributes;
- two writers to one destination never leave one's model beside the other's companion;
- SIGHUP / SIGQUIT clean up like SIGINT / SIGTERM, a killed writer's temporary folder is swept
  by the next write in that folder (a live writer's never), and names of 255 bytes work.

Special files are made in the test's own folder (mknod needs root): the real /dev/null is never
a destination here, since the code before the fix replaced it."""

from __future__ import annotations

import multiprocessing
import os
import resource
import signal
import socket
import stat
import threading
from pathlib import Path
from typing import Callable

import pytest

from attn2onnx.errors import UsageError
from attn2onnx.fileio import atomic_output, check_destination
from special_files import FifoReader, mknod, slow_renames

DATA = ".data"


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _write(path: Path, data: bytes, companion: bytes | None = None) -> None:
    """One atomic write of ``data`` to ``path`` (and ``companion`` to ``<path>.data``)."""
    with atomic_output(path, companions=[DATA]) as tmp:
        tmp.write_bytes(data)
        if companion is not None:
            Path(f"{tmp}{DATA}").write_bytes(companion)


def _null_device(path: Path) -> Path:
    """A node of the null device (1, 3): what `-o /dev/null` writes to."""
    return mknod(path, stat.S_IFCHR, 1, 3)


def _bound_socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    return sock


def _in_a_thread(write: Callable[[], None], release: Path) -> BaseException | None:
    """Run ``write`` in a thread; if it still runs after a minute (blocked opening the FIFO
    ``release``), open ``release`` to read to free it, and fail. Returns what it raised."""
    raised: list[BaseException] = []

    def body() -> None:
        try:
            write()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            raised.append(e)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    thread.join(timeout=60)
    if thread.is_alive():
        fd = os.open(release, os.O_RDONLY | os.O_NONBLOCK)
        thread.join(timeout=10)
        os.close(fd)
        pytest.fail("the write blocked on a FIFO that nobody reads")
    return raised[0] if raised else None


# --- item 2: special files ------------------------------------------------------------------
def test_a_fifo_with_a_reader_gets_the_bytes_and_stays_a_fifo(tmp_path):
    fifo = tmp_path / "out.npz"
    os.mkfifo(fifo)
    reader = FifoReader(fifo)
    payload = os.urandom(300_000)  # more than a pipe buffer
    _write(fifo, payload)
    assert reader.result() == payload
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and _entries(tmp_path) == ["out.npz"]


def test_a_fifo_nobody_reads_is_refused_in_one_line(tmp_path):
    """No reader: opening it to write would block forever (or the FIFO was renamed over)."""
    fifo = tmp_path / "out.npz"
    os.mkfifo(fifo)
    error = _in_a_thread(lambda: _write(fifo, b"npz"), fifo)
    assert isinstance(error, UsageError) and "reading" in str(error) and "\n" not in str(error)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and _entries(tmp_path) == ["out.npz"]


def test_a_character_device_is_written_through(tmp_path):
    """`-o /dev/null` as root used to turn the device into a regular file."""
    null = _null_device(tmp_path / "null")
    _write(null, b"npz bytes")
    st = os.lstat(null)
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    assert _entries(tmp_path) == ["null"]


def test_a_symlink_to_a_character_device_is_written_through(tmp_path):
    null = _null_device(tmp_path / "null")
    os.symlink(null, tmp_path / "out.pt")
    _write(tmp_path / "out.pt", b"checkpoint")
    assert stat.S_ISCHR(os.lstat(null).st_mode) and (tmp_path / "out.pt").is_symlink()
    assert _entries(tmp_path) == ["null", "out.pt"]


@pytest.mark.parametrize("kind", ["socket", "block device"])
def test_a_socket_or_block_device_is_refused_in_one_line(tmp_path, kind):
    """Refused before anything is written (check_destination, which commands call early, too)."""
    out = tmp_path / "out.onnx"
    if kind == "socket":
        keep = _bound_socket(out)
    else:
        keep = mknod(out, stat.S_IFBLK, 7, 0)  # a loop device: never opened here
    is_kind = stat.S_ISSOCK if kind == "socket" else stat.S_ISBLK
    with pytest.raises(UsageError, match="socket|block device") as raised:
        check_destination(out)
    assert "\n" not in str(raised.value)
    with pytest.raises(UsageError, match="socket|block device"):
        _write(out, b"model")
    assert is_kind(os.lstat(out).st_mode) and _entries(tmp_path) == ["out.onnx"]
    del keep


def test_a_companion_on_a_device_is_written_through(tmp_path):
    """`<out>.data` a link to a null device: the weights go there, the model is renamed."""
    null = _null_device(tmp_path / "null")
    os.symlink(null, tmp_path / "m.onnx.data")
    _write(tmp_path / "m.onnx", b"model", companion=b"weights")
    assert (tmp_path / "m.onnx").read_bytes() == b"model" and (tmp_path / "m.onnx.data").is_symlink()
    assert stat.S_ISCHR(os.lstat(null).st_mode) and _entries(tmp_path) == ["m.onnx", "m.onnx.data", "null"]


def test_a_model_with_data_cannot_go_to_a_device_alone(tmp_path):
    """The model on /dev/null would point at a <name>.data made in /dev: refused in one line."""
    null = _null_device(tmp_path / "null")
    with pytest.raises(UsageError, match="regular file") as raised:
        _write(null, b"model", companion=b"weights")
    assert "\n" not in str(raised.value)
    assert stat.S_ISCHR(os.lstat(null).st_mode) and _entries(tmp_path) == ["null"]


# --- item 3: a rewrite keeps mode, owner, extended attributes ---------------------------------
@pytest.mark.parametrize("mode", [0o600, 0o640, 0o755, 0o444])
def test_a_rewrite_keeps_the_mode(tmp_path, umask_022, mode):
    """A 0600 file came back 0644 (0666 & ~umask)."""
    out = tmp_path / "m.pt"
    out.write_bytes(b"old")
    out.chmod(mode)
    _write(out, b"new")
    assert out.read_bytes() == b"new" and stat.S_IMODE(out.stat().st_mode) == mode


def test_companions_keep_theirs_and_a_new_one_takes_the_models(tmp_path, umask_022):
    """An existing .data keeps its own mode; a new one beside a private model is as private."""
    out = tmp_path / "m.onnx"
    out.write_bytes(b"old")
    out.chmod(0o600)
    _write(out, b"new", companion=b"weights")
    assert stat.S_IMODE(Path(f"{out}{DATA}").stat().st_mode) == 0o600
    Path(f"{out}{DATA}").chmod(0o640)
    _write(out, b"newer", companion=b"more weights")
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert stat.S_IMODE(Path(f"{out}{DATA}").stat().st_mode) == 0o640


def test_a_new_file_still_gets_what_open_would_give(tmp_path, umask_022):
    _write(tmp_path / "m.pt", b"new")
    assert stat.S_IMODE((tmp_path / "m.pt").stat().st_mode) == 0o644


def test_a_rewrite_through_a_symlink_keeps_the_targets_mode(tmp_path, umask_022):
    target = tmp_path / "real.pt"
    target.write_bytes(b"old")
    target.chmod(0o600)
    os.symlink(target, tmp_path / "link.pt")
    _write(tmp_path / "link.pt", b"new")
    assert target.read_bytes() == b"new" and stat.S_IMODE(target.stat().st_mode) == 0o600


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_a_rewrite_keeps_the_owner(tmp_path):
    out = tmp_path / "m.pt"
    out.write_bytes(b"old")
    os.chown(out, 4321, 4322)
    out.chmod(0o640)
    _write(out, b"new")
    st = out.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (4321, 4322, 0o640)


def test_a_rewrite_keeps_extended_attributes(tmp_path):
    out = tmp_path / "m.pt"
    out.write_bytes(b"old")
    try:
        os.setxattr(out, "user.attn2onnx.test", b"kept")
    except OSError as e:
        pytest.skip(f"this file system takes no user extended attributes ({e.strerror})")
    _write(out, b"new")
    assert os.getxattr(out, "user.attn2onnx.test") == b"kept"


# --- item 4: two writers to one destination -------------------------------------------------
def _pair_writer(folder: Path, tag: str, rounds: int, start, done) -> None:  # noqa: ANN001 - barriers
    """Child: each round, write "<tag><round>" as model and companion. Renames are slowed by a
    random pause (a slow or busy file system) so two writers' renames interleave."""
    slow_renames(tag)
    for r in range(rounds):
        start.wait(timeout=60)
        _write(folder / "m.onnx", f"{tag}{r}".encode(), companion=f"{tag}{r}".encode())
        done.wait(timeout=60)


def test_concurrent_writers_never_pair_one_model_with_the_others_data(tmp_path):
    """Two processes write distinct model/data pairs to one destination, round after round:
    after each round the model and its data come from the same write (before the fix, model
    and companion were renamed separately and about one round in four mixed them)."""
    rounds = 40
    ctx = multiprocessing.get_context("fork")
    start, done = ctx.Barrier(3), ctx.Barrier(3)
    writers = [ctx.Process(target=_pair_writer, args=(tmp_path, tag, rounds, start, done)) for tag in "AB"]
    for w in writers:
        w.start()
    mixed = []
    try:
        for r in range(rounds):
            start.wait(timeout=60)
            done.wait(timeout=60)
            model, data = (tmp_path / "m.onnx").read_bytes(), (tmp_path / "m.onnx.data").read_bytes()
            if model != data:
                mixed.append((r, model, data))
    finally:
        for w in writers:
            w.join(timeout=60)
            w.kill()
    assert [w.exitcode for w in writers] == [0, 0]
    assert not mixed, f"{len(mixed)} of {rounds} rounds left a model beside another write's data: {mixed[:3]}"
    assert _entries(tmp_path) == ["m.onnx", "m.onnx.data"]


# --- item 5: signals, killed writers, long names ----------------------------------------------
def _fork_writer(out: Path, signals_default: tuple[int, ...] = ()) -> tuple[int, int]:
    """Fork a child that starts writing ``out``, says "w" on a pipe, then waits for a byte on a
    second pipe before it finishes the write (exit 0). Returns (pid, release fd)."""
    ready_r, ready_w = os.pipe()
    release_r, release_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # SIGQUIT: no core file in the repo
            for signum in signals_default:
                signal.signal(signum, signal.SIG_DFL)
            with atomic_output(out) as tmp:
                tmp.write_bytes(b"partial")
                os.write(ready_w, b"w")
                os.read(release_r, 1)
                tmp.write_bytes(b"new")
            status = 0
        finally:
            os._exit(status)
    os.close(ready_w)
    os.close(release_r)
    assert os.read(ready_r, 1) == b"w"
    os.close(ready_r)
    return pid, release_w


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGQUIT])
def test_sighup_and_sigquit_mid_write_remove_the_temporary(tmp_path, signum):
    """They killed the writer and left its temporary folder; now they clean up like SIGTERM,
    then end the process with the signal's own action."""
    out = tmp_path / "m.pt"
    out.write_bytes(b"old")
    pid, release = _fork_writer(out, signals_default=(signum,))
    assert len(_entries(tmp_path)) == 2  # the temporary folder exists while writing
    os.kill(pid, signum)
    _, status = os.waitpid(pid, 0)
    os.close(release)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signum
    assert _entries(tmp_path) == ["m.pt"] and out.read_bytes() == b"old"


def test_the_next_write_sweeps_a_killed_writers_temporary(tmp_path):
    """SIGKILL cannot be handled: the next write in the folder removes what the dead writer left."""
    out = tmp_path / "m.pt"
    out.write_bytes(b"old")
    pid, release = _fork_writer(out)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    os.close(release)
    assert len(_entries(tmp_path)) == 2  # the dead writer's leftover
    _write(tmp_path / "other.pt", b"other")
    assert _entries(tmp_path) == ["m.pt", "other.pt"] and out.read_bytes() == b"old"


def test_a_live_writers_temporary_is_never_swept(tmp_path):
    out = tmp_path / "m.pt"
    out.write_bytes(b"old")
    pid, release = _fork_writer(out)
    try:
        _write(tmp_path / "other.pt", b"other")
        assert len(_entries(tmp_path)) == 3  # m.pt, other.pt and the live writer's temporary
    finally:
        os.write(release, b"go")
        os.close(release)
        _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert _entries(tmp_path) == ["m.pt", "other.pt"] and out.read_bytes() == b"new"


def test_foreign_and_unknown_temporaries_are_left_alone(tmp_path):
    """Only a folder provably left by a dead writer of this machine and boot goes: one named by
    another machine (another marker), an older release's or a user's look-alike stay."""
    pid, release = _fork_writer(tmp_path / "m.pt")
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    os.close(release)
    (left,) = [p.name for p in tmp_path.iterdir()]
    parts = left.split("-")
    foreign = "-".join([*parts[:2], "f" * len(parts[2]), *parts[3:]])
    for name in (foreign, ".m.pt.abc123.tmp", ".attn2onnx-notapid-x.tmp"):
        (tmp_path / name).mkdir()
    _write(tmp_path / "other.pt", b"other")
    assert _entries(tmp_path) == sorted([foreign, ".m.pt.abc123.tmp", ".attn2onnx-notapid-x.tmp", "other.pt"])


def test_a_name_of_255_bytes_can_be_written(tmp_path):
    """The temporary folder's name was longer than the output's: 243+ bytes failed."""
    out = tmp_path / ("é" * 100 + "m" * 50 + ".onnx")
    assert len(out.name.encode()) == 255
    _write(out, b"model")
    assert out.read_bytes() == b"model" and _entries(tmp_path) == [out.name]
