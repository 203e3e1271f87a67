"""Atomic output files, the one way attn2onnx writes anything.

:func:`atomic_output` yields a path in a private temporary folder beside the destination. The
caller writes there (and may write companions such as ``<name>.data`` next to it); on success
every file is fsynced, given the mode, owner and extended attributes of the file it replaces
(a new file: the mode a plain ``open()`` gives, 0666 & ~umask; a new companion: its main
file's) and renamed over its destination, companions first and the main file last, under an
exclusive lock on the folder so that two writers never leave one's model beside the other's
companion. On any failure, and on SIGINT / SIGTERM / SIGHUP / SIGQUIT while writing, the
temporary folder is removed and the old files stay as they were; a folder left by a writer
that was killed (SIGKILL) is removed by the next write in that folder. An output that is the
same file as one of the inputs is refused before anything is made.

A destination that is no regular file is never renamed over: a FIFO (with a reader) or a
character device (``-o /dev/null``) is written through, a FIFO nobody reads, a socket or a
block device is refused in one line.

Reading: :func:`regular_file` is the check every reader of a user's file makes first (a FIFO or
a device would block the reader or never end).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import os
import re
import shutil
import signal
import stat
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from .errors import UsageError

# The signals that abort a write; after cleaning up, each is delivered again to the handler
# that was there before (KeyboardInterrupt, so exit 130, or the default action: killed, 143).
_ABORT_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)

# A temporary folder is ".attn2onnx-<writer pid>-<marker>-<random>.tmp" (short whatever the
# output's name, so names up to the file system's 255 bytes work); the marker names the
# writer's boot and pid namespace (:func:`_writer_marker`).
_TEMP_PREFIX = ".attn2onnx-"
_TEMP_NAME = re.compile(r"\.attn2onnx-(\d{1,7})-([0-9a-f]{12})-[a-z0-9_]+\.tmp")
_NO_MARKER = "0" * 12

PathLike = str | os.PathLike


def _same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file: by device and inode where both exist (hard links,
    symlinks), by their resolved paths otherwise."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def _input_files(inputs: Iterable[PathLike | None]) -> Iterator[Path]:
    """The files ``inputs`` name: a folder stands for the files in it, ``None`` for nothing."""
    for each in inputs:
        if each is not None and Path(each).is_dir():
            yield from (p for p in Path(each).iterdir() if p.is_file())
        elif each is not None:
            yield Path(each)


def refuse_overwriting_inputs(outputs: Iterable[PathLike], inputs: Iterable[PathLike | None]) -> None:
    """Raise a one-line UsageError when an output is the same file as an input (a folder input
    stands for the files in it; ``None``, an option not given, for nothing). Commands call this
    before any work."""
    sources = list(_input_files(inputs))
    for out in map(Path, outputs):
        for source in sources:
            if _same_file(out, source):
                raise UsageError(f"output {out} is the same file as input {source}; write to another path")


def regular_file(path: PathLike) -> Path:
    """``path`` when it names a regular file (symlinks followed), else a one-line error: missing
    (FileNotFoundError), a folder (IsADirectoryError), or a FIFO, socket or device (UsageError:
    reading a pipe with no writer blocks forever, a device may never end). Readers of user files
    call this before opening them."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {path}") from None
    except ValueError:  # a NUL byte in the name
        raise UsageError(f"{str(path)!r} is not a valid file name") from None
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(f"{path} is a folder, not a file")
    if not stat.S_ISREG(mode):
        raise UsageError(f"{path} is not a regular file (a pipe, socket or device); give a file")
    return path


def _writes_through(path: Path) -> bool:
    """Whether ``path`` is an existing FIFO or character device, which an output is written
    into, not renamed over (``-o /dev/null``, ``-o >(gzip > out.gz)``). A socket or a block
    device is refused in one line: neither is a place for a model."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):  # absent, or unreachable: the rename path reports it
        return False
    if stat.S_ISSOCK(mode):
        raise UsageError(f"{path} is a socket; give a file name")
    if stat.S_ISBLK(mode):
        raise UsageError(f"{path} is a block device; give a file name (attn2onnx does not write disks)")
    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)


def _destination(path: Path) -> tuple[Path, bool]:
    """:func:`check_destination`'s path and whether it is written through (see there)."""
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file name such as {path / 'model.pt'}")
    if _writes_through(path):
        return path, True  # opened as given: /dev/fd/N of a pipe has no real path to resolve
    dest = Path(os.path.realpath(path))
    if dest.parent.exists() and not dest.parent.is_dir():
        raise NotADirectoryError(f"{path.parent} is a file, not a folder; {path} cannot be written")
    if not dest.parent.is_dir():
        raise FileNotFoundError(f"folder {path.parent} does not exist")
    return dest, False


def check_destination(path: PathLike) -> Path:
    """The resolved destination of an output ``path`` (through a symlink, its target), refused
    in one line when it is a folder, a socket or a block device, or its folder does not exist
    (outputs never create folders). A FIFO or character device is returned as given: it is
    written through. :func:`atomic_output` checks this; commands call it before long work as well."""
    return _destination(Path(path))[0]


def written_through(path: PathLike) -> bool:
    """Whether :func:`atomic_output` writes ``path`` into a FIFO or character device (checked as
    :func:`check_destination` does): nothing can read such an output back after writing it."""
    return _destination(Path(path))[1]


def _umask() -> int:
    """The process umask. Linux shows it in /proc; elsewhere os.umask must set it to read it."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class _Aborted(BaseException):
    """Raised inside the write by :class:`_SignalGuard`; the signal is re-delivered after cleanup."""


class _SignalGuard:
    """While installed, the first of :data:`_ABORT_SIGNALS` raises :class:`_Aborted` in the write,
    or waits for the end of a :meth:`deferred` section (creating the temporary folder, the
    renames), so the files are never left half-moved; later signals do not interrupt the cleanup.
    Uninstalling restores the previous handlers and delivers the signal to them:
    KeyboardInterrupt (exit 130) or the default action (killed by the signal: 143 for SIGTERM,
    129 for SIGHUP, 131 and a core file where allowed for SIGQUIT)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.aborted = False
        self._deferring = False
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, _frame: object) -> None:
        if self.received is None:
            self.received = signum
            if not self._deferring:
                self.aborted = True
                raise _Aborted(signum)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """A section that a signal does not interrupt (it is delivered when the write ends)."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Handlers for the block only. Only the main thread can handle signals, so elsewhere, and
        for a signal that is ignored (nohup) or handled outside Python, nothing is installed."""
        if threading.current_thread() is threading.main_thread():
            handlers = {s: signal.getsignal(s) for s in _ABORT_SIGNALS}
            self._previous = {s: h for s, h in handlers.items() if h is not None and h != signal.SIG_IGN}
        for signum in self._previous:
            signal.signal(signum, self._handle)
        try:
            yield
        except _Aborted:
            pass
        finally:
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)
        if self.received is not None:
            signal.raise_signal(self.received)
            if self.aborted:  # the previous handler returned, yet the write did not happen
                raise SystemExit(128 + self.received)


@functools.cache
def _writer_marker() -> str:
    """12 hex digits naming this boot of this machine and this pid namespace: a temporary folder
    carries its writer's pid, which names the same process only under the same marker. Where
    /proc does not tell, a marker no writer sweeps (:data:`_NO_MARKER`)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return _NO_MARKER
    return hashlib.sha256(f"{boot} {namespace}".encode()).hexdigest()[:12]


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (EPERM: it does, owned by someone else)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _sweep_dead_writers(folder: Path) -> None:
    """Remove the temporary folders in ``folder`` that writers of this machine, boot and pid
    namespace left when killed (SIGKILL, a crash, power loss of the process): their pid no
    longer runs. A live writer's folder, another machine's or namespace's, an older release's
    (no pid in its name) and anything else stay: only a provably dead writer's goes."""
    marker = _writer_marker()
    if marker == _NO_MARKER:
        return
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        found = _TEMP_NAME.fullmatch(name)
        if found and found[2] == marker and not _alive(int(found[1])):
            shutil.rmtree(folder / name, ignore_errors=True)


def _make_temp_dir(folder: Path) -> Path:
    """A new private temporary folder in ``folder``, named after this writer (:data:`_TEMP_NAME`)."""
    prefix = f"{_TEMP_PREFIX}{os.getpid()}-{_writer_marker()}-"
    return Path(tempfile.mkdtemp(dir=folder, prefix=prefix, suffix=".tmp"))


@dataclass(frozen=True)
class _Output:
    """One written file: where it was written, what it replaces, and whether it is written
    through (a FIFO or device) instead of renamed."""

    written: Path
    dest: Path
    through: bool


def _plan(tmp_dir: Path, dest: Path, through: bool, companions: Sequence[str]) -> list[_Output]:
    """The written files in commit order (companions first, the main file last). A companion
    beside a main file written through must be written through as well: a model on /dev/null
    or a pipe cannot take a ``<name>.data`` made beside the device."""
    outputs = []
    for suffix in companions:
        written = tmp_dir / (dest.name + suffix)
        if os.path.isfile(written):  # False for a name too long to exist, too
            companion = Path(f"{dest}{suffix}")
            outputs.append(_Output(written, companion, _writes_through(companion)))
            if through and not outputs[-1].through:
                raise UsageError(
                    f"{dest} is a pipe or device, but this output also writes {companion.name} beside it; "
                    "give a regular file name"
                )
    return [*outputs, _Output(tmp_dir / dest.name, dest, through)]


def _regular(path: Path) -> os.stat_result | None:
    """The stat of ``path`` where it is a regular file (what a rename replaces), else None."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st if stat.S_ISREG(st.st_mode) else None


def _copy_xattrs(source: Path, target: Path) -> None:
    """Copy the extended attributes of ``source`` (POSIX ACLs, user attributes, security
    labels) to ``target``, best effort: one the file system or our rights refuse is skipped."""
    with contextlib.suppress(OSError, AttributeError):  # AttributeError: no xattr calls on this OS
        for name in os.listxattr(source):
            with contextlib.suppress(OSError):
                os.setxattr(target, name, os.getxattr(source, name))


def _take_metadata(written: Path, like: Path | None) -> None:
    """Give ``written`` the owner (where permitted: root, or a group of ours), extended
    attributes and mode of ``like``, the file it replaces; with none, 0666 & ~umask."""
    if like is None:
        os.chmod(written, 0o666 & ~_umask())
        return
    st = os.stat(like)
    mine = os.stat(written)
    if (mine.st_uid, mine.st_gid) != (st.st_uid, st.st_gid):
        try:
            os.chown(written, st.st_uid, st.st_gid)
        except OSError:
            with contextlib.suppress(OSError):
                os.chown(written, -1, st.st_gid)
    _copy_xattrs(like, written)
    os.chmod(written, stat.S_IMODE(st.st_mode))  # last: chown clears set-id bits


def _prepare(outputs: Sequence[_Output]) -> None:
    """Sync the files to be renamed and give each the metadata of the file it replaces (a new
    companion: its main file's). Nothing is replaced yet, so a signal here (the fsync of a
    large file takes long) still aborts the write."""
    main = outputs[-1].dest if _regular(outputs[-1].dest) else None
    for each in outputs:
        if each.through:
            continue
        with open(each.written, "rb") as f:
            os.fsync(f.fileno())
        _take_metadata(each.written, each.dest if _regular(each.dest) else main)


def _write_through(written: Path, dest: Path) -> None:
    """Copy ``written`` into the FIFO or device ``dest``. A FIFO is opened without blocking, so
    one that nobody reads is refused in one line instead of waiting forever; opening it only
    now (not to check it early) keeps its reader from seeing an early end of file."""
    fifo = stat.S_ISFIFO(os.stat(dest).st_mode)
    try:
        fd = os.open(dest, os.O_WRONLY | os.O_CLOEXEC | (os.O_NONBLOCK if fifo else 0))
    except OSError as e:
        if fifo and e.errno == errno.ENXIO:
            raise UsageError(f"nothing is reading the pipe {dest}; start its reader first") from None
        raise
    try:
        os.set_blocking(fd, True)
        with open(written, "rb") as source, open(fd, "wb", closefd=False) as target:
            shutil.copyfileobj(source, target, 1 << 20)
    except BrokenPipeError:
        raise UsageError(f"the reader of {dest} stopped before the whole output was written") from None
    finally:
        os.close(fd)


def _commit(outputs: Sequence[_Output]) -> None:
    """Rename the prepared files over their destinations, in order, holding an exclusive lock
    on their folder: a second writer's renames wait, so the files on disk always come from one
    write (a model never points at another write's data). A folder that cannot be locked (some
    network file systems) is written unlocked, as before."""
    folder = outputs[-1].dest.parent
    fd = None
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | os.O_CLOEXEC)
        fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        for each in outputs:
            os.replace(each.written, each.dest)
        if fd is not None:
            with contextlib.suppress(OSError):  # not every platform / file system can sync a folder
                os.fsync(fd)
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


@contextlib.contextmanager
def atomic_output(
    path: PathLike, *, inputs: Iterable[PathLike | None] = (), companions: Sequence[str] = ()
) -> Iterator[Path]:
    """Yield ``<temporary folder>/<name of path>`` beside ``path``; when the block succeeds it
    replaces ``path`` (through a symlink, its target, as ``open()`` would write it), or is
    written into it where ``path`` is a FIFO or character device (the temporary folder is then
    in the system's temporary folder).

    ``companions`` are suffixes of files that belong with the output (``".data"``): written as
    ``<temporary path><suffix>`` they replace ``<path><suffix>`` first. ``inputs`` are refused
    as outputs (see :func:`refuse_overwriting_inputs`).
    """
    path = Path(path)
    dest, through = _destination(path)
    refuse_overwriting_inputs([path, *(f"{dest}{suffix}" for suffix in companions)], inputs)
    folder = Path(tempfile.gettempdir()) if through else dest.parent
    _sweep_dead_writers(folder)
    guard = _SignalGuard()
    with guard.installed():
        with guard.deferred():
            tmp_dir = _make_temp_dir(folder)
        try:
            yield tmp_dir / dest.name
            outputs = _plan(tmp_dir, dest, through, companions)
            _prepare(outputs)
            for each in outputs:
                if each.through:
                    _write_through(each.written, each.dest)
            renamed = [each for each in outputs if not each.through]
            if renamed:
                with guard.deferred():
                    _commit(renamed)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
