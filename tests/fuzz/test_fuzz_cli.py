"""Hostile inputs for every ``attn2onnx`` command, run through ``attn2onnx.cli.main`` (forked,
see harness): each must end with exit 2 and one ``attn2onnx: error:`` line, no traceback, no
file created or changed, no payload run, no hang.

One test function per family of cases, parametrised over the generated cases (generators)."""

from __future__ import annotations

from pathlib import Path

import pytest

from . import generators as gen
from .harness import contract_problems, run_forked, snapshot

TIMEOUT_S = 60.0


def params(cases: list[gen.Case]) -> list:
    return [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.slow else []) for c in cases]


def check(case: gen.Case, sources: gen.Sources, tmp_path: Path) -> None:
    """Build the case in ``tmp_path``, run it and assert the error contract."""
    ws = gen.Workspace(tmp_path / "case", sources)
    ws.root.mkdir()
    argv = case.make(ws)
    before = snapshot(ws.root)
    outcome = run_forked(argv, ws.root, TIMEOUT_S)
    problems = contract_problems(outcome, before, snapshot(ws.root), ws.marker)
    assert not problems, f"{case.id}: {'; '.join(problems)}\n  argv: {argv}\n  observed: {outcome.describe()}"


@pytest.mark.parametrize("case", params(gen.file_cases()))
def test_damaged_file(case, sources, tmp_path):
    check(case, sources, tmp_path)


@pytest.mark.parametrize("case", params(gen.pickle_payload_cases() + gen.program_payload_cases()))
def test_payload_never_runs(case, sources, tmp_path):
    check(case, sources, tmp_path)


@pytest.mark.parametrize("case", params(gen.external_data_cases()))
def test_external_data_stays_in_the_model_folder(case, sources, tmp_path):
    check(case, sources, tmp_path)


@pytest.mark.parametrize("case", params(gen.node_cases()))
def test_malformed_node(case, sources, tmp_path):
    check(case, sources, tmp_path)


@pytest.mark.parametrize("case", params(gen.option_cases()))
def test_option_limits(case, sources, tmp_path):
    check(case, sources, tmp_path)


@pytest.mark.parametrize("case", params(gen.path_cases()))
def test_hostile_path(case, sources, tmp_path):
    check(case, sources, tmp_path)


# --- controls: the valid versions of the hostile inputs work, so the cases test what they say -
@pytest.mark.parametrize("op", list(gen.OP_INPUTS))
def test_valid_node_runs(op, sources, tmp_path):
    path = tmp_path / "node.onnx"
    path.write_bytes(gen.node_baselines()[op]())
    outcome = run_forked(["run", str(path)], tmp_path, TIMEOUT_S)
    assert outcome.status == 0, outcome.describe()


def test_valid_sources_work(sources, tmp_path):
    """The source models run, validate and export (the program was traced at batch 2 x 8 tokens)."""
    for argv in (
        ["run", str(sources.onnx), "--inputs", str(sources.inputs)],
        ["validate", str(sources.onnx), "--reference", str(sources.checkpoint), "--shapes", "2x8"],
        [
            "export",
            str(sources.program),
            "-o",
            str(tmp_path / "program.onnx"),
            "--static",
            "--batch",
            "2",
            "--seq-len",
            "8",
        ],
    ):
        outcome = run_forked(argv, tmp_path, TIMEOUT_S)
        assert outcome.status == 0, f"{argv[0]}: {outcome.describe()}"
