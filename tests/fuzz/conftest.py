"""Fixtures of the fuzz suite: the session's tiny source models, and the default sample.

``ATTN2ONNX_FUZZ=full`` runs every case. Otherwise the cases marked ``slow`` (a wrongly accepted
input there costs a whole model build, export or subprocess) run as a fixed sample: those
whose node id hashes into 1 of SLOW_SAMPLE_EVERY buckets, the same on every run, plus the
PINNED cases (defects found by this suite: each stays in every run); the rest are deselected
(not skipped, so nothing unrun counts as passed). Every case that fails before any heavy work
runs always. The terminal summary counts the cases run per kind.
"""

from __future__ import annotations

import os
import re
import zlib
from collections import Counter
from pathlib import Path

import pytest

from .generators import Sources, make_sources

SLOW_SAMPLE_EVERY = 8
FUZZ_DIR = Path(__file__).parent
# Slow cases that once exposed a defect (issue 11): kept in the default selection.
PINNED = {
    "corrupt-checkpoint:zero16-s0/export",  # damaged weight bytes loaded: torch checks no CRC
    "corrupt-pickle:zero64-s1/export-trusted",  # the same through --trust-pickle
    "corrupt-pickle:first-byte/export-trusted",  # a 1-byte "pickle": traceback from the unpickler
    "option:demo/--variants=empty",  # an empty list started the whole demo
}
_CASE_ID = re.compile(r"\[([^\]]+)\]$")


def full_run() -> bool:
    return os.environ.get("ATTN2ONNX_FUZZ", "").lower() == "full"


def case_id(item: pytest.Item) -> str | None:
    """The generated case's id (``kind:name``) of a fuzz test item, None for the other tests."""
    found = _CASE_ID.search(item.nodeid)
    return found.group(1) if found and ":" in found.group(1) else None


def sampled_out(item: pytest.Item) -> bool:
    """Whether the default run leaves ``item`` out (slow, not pinned, not in the sample)."""
    return (
        FUZZ_DIR in Path(item.path).parents
        and item.get_closest_marker("slow") is not None
        and case_id(item) not in PINNED
        and zlib.crc32(item.nodeid.encode()) % SLOW_SAMPLE_EVERY != 0
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not full_run():
        keep, drop = [], []
        for item in items:
            (drop if sampled_out(item) else keep).append(item)
        if drop:
            config.hook.pytest_deselected(items=drop)
            items[:] = keep
    config.stash[_KINDS] = Counter(
        (case_id(item) or "").split(":")[0] or "other" for item in items if FUZZ_DIR in Path(item.path).parents
    )


_KINDS = pytest.StashKey[Counter]()


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:  # noqa: ANN001 - pytest's hook
    kinds = config.stash.get(_KINDS, None)
    if kinds:
        mode = "full" if full_run() else f"default (slow cases: 1 in {SLOW_SAMPLE_EVERY} + {len(PINNED)} pinned)"
        listed = ", ".join(f"{kind} {count}" for kind, count in sorted(kinds.items()))
        terminalreporter.write_line(f"fuzz cases selected, {mode}: {sum(kinds.values())} ({listed})")


@pytest.fixture(scope="session")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Sources:
    """The tiny valid models (checkpoint, export, .pt2 program, pickled module, inputs), made once."""
    return make_sources(tmp_path_factory.mktemp("fuzz-sources"))
