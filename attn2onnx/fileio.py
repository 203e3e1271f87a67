"""Atomic output files, the one way attn2onnx writes anything.

:func:`atomic_output` yields a path in a private temporary folder beside the destination. The
caller writes there (and may write companions such as ``<name>.data`` next to it); on success
every file is fsynced, given the mode a plain ``open()`` would give it (0666 & ~umask), and
renamed over its destination, companions first and the main file last. On any failure, and on
SIGINT / SIGTERM while writing, the temporary folder is removed and the old files stay as they
were. An output that is the same file as one of the inputs is refused before anything is made.

Reading: :func:`regular_file` is the check every reader of a user's file makes first (a FIFO or
a device would block the reader or never end).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import tempfile
import threading
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from .errors import UsageError

# The signals that abort a write; after cleaning up, each is delivered again to the handler
# that was there before (KeyboardInterrupt, so exit 130, or the default action: killed, 143).
_ABORT_SIGNALS = (signal.SIGINT, signal.SIGTERM)

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


def check_destination(path: PathLike) -> Path:
    """The resolved destination of an output ``path`` (through a symlink, its target), refused
    in one line when it is a folder or its folder does not exist (outputs never create folders).
    :func:`atomic_output` checks this; commands call it before long work as well."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file name such as {path / 'model.pt'}")
    dest = Path(os.path.realpath(path))
    if dest.parent.exists() and not dest.parent.is_dir():
        raise NotADirectoryError(f"{path.parent} is a file, not a folder; {path} cannot be written")
    if not dest.parent.is_dir():
        raise FileNotFoundError(f"folder {path.parent} does not exist")
    return dest


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
    """While installed, the first SIGINT / SIGTERM raises :class:`_Aborted` in the write, or waits
    for the end of a :meth:`deferred` section (creating the temporary folder, the renames), so the
    files are never left half-moved; later signals do not interrupt the cleanup. Uninstalling
    restores the previous handlers and delivers the signal to them: KeyboardInterrupt (exit 130)
    or the default action (killed by SIGTERM, 143)."""

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


def _prepare(tmp_dir: Path, name: str, companions: Sequence[str]) -> list[str]:
    """Sync the written files of ``tmp_dir`` and give them 0666 & ~umask; returns their names in
    rename order (companions first, the main file last). Nothing is replaced yet, so a signal
    here (the fsync of a large file takes long) still aborts the write."""
    mode = 0o666 & ~_umask()
    names = [name + suffix for suffix in companions if (tmp_dir / (name + suffix)).is_file()] + [name]
    for each in names:
        with open(tmp_dir / each, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_dir / each, mode)
    return names


def _commit(tmp_dir: Path, folder: Path, names: Sequence[str]) -> None:
    """Rename the prepared files of ``tmp_dir`` over their destinations in ``folder``, in order."""
    for each in names:
        os.replace(tmp_dir / each, folder / each)
    with contextlib.suppress(OSError):  # not every platform / file system can sync a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_output(
    path: PathLike, *, inputs: Iterable[PathLike | None] = (), companions: Sequence[str] = ()
) -> Iterator[Path]:
    """Yield ``<temporary folder>/<name of path>`` beside ``path``; when the block succeeds it
    replaces ``path`` (through a symlink, its target, as ``open()`` would write it).

    ``companions`` are suffixes of files that belong with the output (``".data"``): written as
    ``<temporary path><suffix>`` they replace ``<path><suffix>`` first. ``inputs`` are refused
    as outputs (see :func:`refuse_overwriting_inputs`).
    """
    path = Path(path)
    dest = check_destination(path)
    refuse_overwriting_inputs([path, *(f"{dest}{suffix}" for suffix in companions)], inputs)
    guard = _SignalGuard()
    with guard.installed():
        with guard.deferred():
            tmp_dir = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
        try:
            yield tmp_dir / dest.name
            names = _prepare(tmp_dir, dest.name, companions)
            with guard.deferred():
                _commit(tmp_dir, dest.parent, names)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
