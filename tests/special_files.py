"""Helpers of the output-safety tests (tests/test_output_safety.py, tests/fuzz/test_fuzz_outputs.py):
device nodes, a FIFO reader, and renames slowed so that two writers' renames interleave."""

from __future__ import annotations

import os
import random
import select
import threading
import time
from pathlib import Path

import pytest

TIMEOUT_S = 60.0


def mknod(path: Path, kind: int, major: int, minor: int) -> Path:
    """A device node at ``path`` (``kind`` stat.S_IFCHR / S_IFBLK); skips without CAP_MKNOD."""
    try:
        os.mknod(path, kind | 0o666, os.makedev(major, minor))
    except PermissionError:
        pytest.skip("making a device node needs root (CAP_MKNOD)")
    return path


class FifoReader:
    """Reads a FIFO to its end in a thread. Opened (non-blocking) before any writer, so a writer
    that checks for a reader finds one; select waits for the first writer (Linux reports no
    hang-up on a FIFO before a writer came)."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self.data = bytearray()
        self.ended = False
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while select.select([self.fd], [], [], TIMEOUT_S)[0]:
            try:
                chunk = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                continue
            if not chunk:
                self.ended = True
                return
            self.data += chunk

    def result(self) -> bytes:
        """Everything read; fails the test when the writer never closed the pipe."""
        self.thread.join(timeout=TIMEOUT_S)
        os.close(self.fd)
        assert self.ended, "the writer never closed the pipe"
        return bytes(self.data)


def slow_renames(seed: str) -> None:
    """In this (child) process, every os.replace pauses 0-4 ms after renaming (a slow or busy
    file system), so two writers' renames interleave; ``seed`` draws the pauses."""
    rng = random.Random(seed)
    rename = os.replace

    def slow_rename(src, dst) -> None:  # noqa: ANN001 - os.replace's signature
        rename(src, dst)
        time.sleep(rng.uniform(0, 0.004))

    os.replace = slow_rename
