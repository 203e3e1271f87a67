"""Fixtures of the fuzz suite: the session's tiny source models, and the default sample.

``ATTN2ONNX_FUZZ=full`` runs every case. Otherwise the cases marked ``slow`` (a wrongly accepted
input there costs a whole model build, export or subprocess) run as a fixed sample: those
whose node id hashes into 1 of SLOW_SAMPLE_EVERY buckets, the same on every run; the rest
are deselected (not skipped, so nothing unrun counts as passed).
"""
from __future__ import annotations

import os
import zlib
from pathlib import Path

import pytest

from .generators import Sources, make_sources

SLOW_SAMPLE_EVERY = 8
FUZZ_DIR = Path(__file__).parent


def full_run() -> bool:
    return os.environ.get("ATTN2ONNX_FUZZ", "").lower() == "full"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if full_run():
        return
    keep, drop = [], []
    for item in items:
        sampled_out = (FUZZ_DIR in Path(item.path).parents and item.get_closest_marker("slow") is not None
                       and zlib.crc32(item.nodeid.encode()) % SLOW_SAMPLE_EVERY != 0)
        (drop if sampled_out else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Sources:
    """The tiny valid models (checkpoint, export, .pt2 program, pickled module, inputs), made once."""
    return make_sources(tmp_path_factory.mktemp("fuzz-sources"))
