"""Crafted attn2onnx metadata (issue 19, item 6): a model file whose ``attn2onnx.decode``,
``attn2onnx.inputs`` or ``attn2onnx.max_seq`` metadata_props lie, are malformed or are hostile
(deep nesting, non-finite numbers, names the graph lacks) must end every command that reads them
(run, generate, validate) with exit 2 and one ``attn2onnx: error:`` line naming the key, no
traceback and nothing written (:mod:`harness`).

Each case rewrites one key of a valid source model (the fuzz session's tiny LM export, and a
tiny decode graph exported here) and runs every command that reads it in a forked child."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable

import onnx
import pytest

from .harness import contract_problems, run_forked, snapshot

TIMEOUT_S = 60.0
DECODE_KEY, INPUTS_KEY, MAX_SEQ_KEY = "attn2onnx.decode", "attn2onnx.inputs", "attn2onnx.max_seq"
DEEP = 100_000  # nesting that json.loads cannot take without a RecursionError
Edit = Callable[[Any], Any]  # the parsed metadata -> what to write instead (a str is written as it is)


def _set(path: tuple, value: Any) -> Edit:
    """An edit that sets (or with ``value`` DROP deletes) the item at ``path`` of a copy."""

    def edit(meta: Any) -> Any:
        meta = copy.deepcopy(meta)
        node = meta
        for key in path[:-1]:
            node = node[key]
        if value is DROP:
            del node[path[-1]]
        else:
            node[path[-1]] = value
        return meta

    return edit


def _raw(text: str) -> Edit:
    return lambda meta: text


def _append(path: tuple, make: Callable[[Any], Any]) -> Edit:
    """An edit that appends ``make(meta)`` to the list at ``path``."""

    def edit(meta: Any) -> Any:
        meta = copy.deepcopy(meta)
        node = meta
        for key in path:
            node = node[key]
        node.append(make(meta))
        return meta

    return edit


DROP = object()
DEEP_LIST = "[" * DEEP + "]" * DEEP

DECODE_CASES: dict[str, Edit] = {
    "not-json": _raw("{"),
    "empty-text": _raw(""),
    "list": _raw("[]"),
    "null": _raw("null"),
    "number": _raw("3"),
    "deep-nesting": _raw(DEEP_LIST),
    "deep-nesting-in-caches": lambda m: json.dumps({**m, "caches": None}).replace("null", DEEP_LIST),
    "missing-vocab_size": _set(("vocab_size",), DROP),
    "missing-max_len": _set(("max_len",), DROP),
    "missing-inputs": _set(("inputs",), DROP),
    "missing-caches": _set(("caches",), DROP),
    "extra-key": _set(("extra",), 1),
    "max_len-string": _set(("max_len",), "16"),
    "max_len-fraction": _set(("max_len",), 16.5),
    "max_len-infinity": lambda m: json.dumps({**m, "max_len": float("inf")}),
    "max_len-nan": lambda m: json.dumps({**m, "max_len": float("nan")}),
    "max_len-1e400": lambda m: json.dumps({**m, "max_len": 0}).replace('"max_len": 0', '"max_len": 1e400'),
    "max_len-zero": _set(("max_len",), 0),
    "max_len-negative": _set(("max_len",), -4),
    "max_len-bool": _set(("max_len",), True),
    "max_len-huge": _set(("max_len",), 10**30),
    "vocab_size-zero": _set(("vocab_size",), 0),
    "vocab_size-lies": _set(("vocab_size",), 1000),
    "inputs-two": _set(("inputs",), ["input_ids", "attention_mask"]),
    "inputs-unknown": _set(("inputs", 1), "mask"),
    "inputs-duplicate": _set(("inputs", 2), "input_ids"),
    "inputs-numbers": _set(("inputs",), [1, 2, 3]),
    "inputs-float-cache": lambda m: _set(("inputs", 2), m["caches"][0]["input"])(m),
    "caches-object": _set(("caches",), {}),
    "caches-empty": _set(("caches",), []),
    "cache-null": _set(("caches", 0), None),
    "cache-missing-dims": _set(("caches", 0, "dims"), DROP),
    "cache-missing-limit": _set(("caches", 0, "limit"), DROP),
    "cache-extra-field": _set(("caches", 0, "extra"), 1),
    "cache-unknown-input": _set(("caches", 0, "input"), "past_key_values.9.key"),
    "cache-unknown-output": _set(("caches", 0, "output"), "present.9.key"),
    "cache-duplicate": _append(("caches",), lambda m: m["caches"][0]),
    "cache-dims-rank": _set(("caches", 0, "dims"), ["batch", "past_window3", 2]),
    "cache-dims-lie": _set(("caches", 0, "dims", 3), 4),
    "cache-dims-no-past": _set(("caches", 0, "dims", 1), 3),
    "cache-dims-nested": _set(("caches", 0, "dims", 2), [2]),
    "cache-limit-lies": _set(("caches", 0, "limit"), 5),
    "cache-limit-string": _set(("caches", 0, "limit"), "3"),
    "cache-full-gets-limit": _set(("caches", -1, "limit"), 2),
    "cache-layer-negative": _set(("caches", 0, "layer"), -1),
}

INPUT_CASES: dict[str, Edit] = {
    "not-json": _raw("[{"),
    "null": _raw("null"),
    "object": _raw("{}"),
    "empty-list": _raw("[]"),
    "numbers": _raw("[1, 2]"),
    "deep-nesting": _raw(DEEP_LIST),
    "missing-name": _set((0, "name"), DROP),
    "missing-dims": _set((0, "dims"), DROP),
    "missing-kind": _set((0, "kind"), DROP),
    "extra-key": _set((0, "extra"), 1),
    "unknown-kind": _set((0, "kind"), "text"),
    "dims-string": _set((0, "dims"), "batch"),
    "dims-rank": _set((0, "dims"), ["batch"]),
    "dims-unknown-name": _set((0, "dims", 1), "tokens"),
    "dims-static-lie": _set((0, "dims", 1), 3),
    "unknown-input": _set((0, "name"), "ids"),
    "duplicate-input": _set((1,), {"name": "input_ids", "dims": ["batch", "seq"], "kind": "ids", "high": 256}),
    "missing-input": lambda m: m[:1],
    "high-negative": _set((0, "high"), -1),
    "high-zero-ids": _set((0, "high"), 0),
    "high-string": _set((0, "high"), "256"),
    "high-infinity": lambda m: json.dumps(_set((0, "high"), float("inf"))(m)),
    "high-huge": _set((0, "high"), 10**30),
    "precision-unknown": _set((0, "precision"), "fp64"),
    "kind-dtype-lie": _set((1, "kind"), "float"),
}

MAX_SEQ_CASES: dict[str, Edit] = {
    "empty": _raw(""),
    "word": _raw("abc"),
    "negative": _raw("-1"),
    "zero": _raw("0"),
    "float": _raw("1e309"),
    "superscript-digit": _raw("\u00b2"),
    "huge": _raw("9" * 5000),
}


def _edited(source: Path, key: str, edit: Edit, folder: Path) -> Path:
    """A copy of the model at ``source`` in ``folder`` with metadata ``key`` rewritten by ``edit``."""
    model = onnx.load(str(source))
    props = {p.key: p.value for p in model.metadata_props}
    value = edit(json.loads(props[key]) if key != MAX_SEQ_KEY else props[key])
    props[key] = value if isinstance(value, str) else json.dumps(value)
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)
    path = folder / "m.onnx"
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def decode_sources(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny 2-layer dcmha LM (layer 0 keeps a 4-key window, so its caches have a limit of 3)
    as a checkpoint and as a decode graph."""
    import attn2onnx
    from attn2onnx.models.decode import export_decode

    folder = tmp_path_factory.mktemp("decode-source")
    config = attn2onnx.ModelConfig(
        family="lm", variant="dcmha", layers=2, d_model=16, heads=2, max_len=16, layer_options=[{"window": 4}, {}]
    )
    model = attn2onnx.build_model(config).eval()
    attn2onnx.save(model, folder / "lm.pt")
    export_decode(model, folder / "lm.onnx")
    return folder / "lm.pt", folder / "lm.onnx"


def check_commands(model: Path, commands: list[list[str]], key: str, folder: Path) -> None:
    """Run each argv (MODEL stands for ``model``) in a forked child; each must keep the error
    contract with a line that names ``key``."""
    failures = []
    for command in commands:
        argv = [str(model) if a == "MODEL" else a for a in command]
        before = snapshot(folder)
        outcome = run_forked(argv, folder, TIMEOUT_S)
        problems = contract_problems(outcome, before, snapshot(folder), folder / "PAYLOAD_RAN")
        if not problems and key not in outcome.stderr:
            problems.append(f"the error does not name {key}")
        if problems:
            failures.append(f"{argv[0]}: {'; '.join(problems)} ({outcome.describe()})")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("case", list(DECODE_CASES), ids=[f"decode-metadata:{c}" for c in DECODE_CASES])
def test_crafted_decode_metadata(case, decode_sources, tmp_path):
    checkpoint, source = decode_sources
    model = _edited(source, DECODE_KEY, DECODE_CASES[case], tmp_path)
    commands = [
        ["run", "MODEL", "--seq-len", "2", "--past", "3", "-o", "out.npz"],
        ["generate", "MODEL", "--prompt-ids", "1,2,3", "--max-new-tokens", "3"],
        ["validate", "MODEL", "--reference", str(checkpoint), "--decode", "--steps", "2"],
    ]
    check_commands(model, commands, DECODE_KEY, tmp_path)


@pytest.mark.parametrize("case", list(INPUT_CASES), ids=[f"inputs-metadata:{c}" for c in INPUT_CASES])
def test_crafted_input_metadata(case, sources, tmp_path):
    model = _edited(sources.onnx, INPUTS_KEY, INPUT_CASES[case], tmp_path)
    commands = [
        ["run", "MODEL", "--inputs", str(sources.inputs), "-o", "out.npz"],
        ["validate", "MODEL", "--reference", str(sources.checkpoint), "--shapes", "1x4"],
    ]
    check_commands(model, commands, INPUTS_KEY, tmp_path)


@pytest.mark.parametrize("case", list(MAX_SEQ_CASES), ids=[f"max-seq-metadata:{c}" for c in MAX_SEQ_CASES])
def test_crafted_max_seq_metadata(case, sources, tmp_path):
    model = _edited(sources.onnx, MAX_SEQ_KEY, MAX_SEQ_CASES[case], tmp_path)
    check_commands(model, [["run", "MODEL", "--seq-len", "4"]], MAX_SEQ_KEY, tmp_path)


def test_untouched_sources_run(decode_sources, sources, tmp_path):
    """Control: the unedited models pass every command above, so the cases test the edit."""
    checkpoint, source = decode_sources
    for argv in (
        ["run", str(source), "--seq-len", "2", "--past", "3"],
        ["generate", str(source), "--prompt-ids", "1,2,3", "--max-new-tokens", "3"],
        ["validate", str(source), "--reference", str(checkpoint), "--decode", "--steps", "2"],
        ["run", str(sources.onnx), "--inputs", str(sources.inputs)],
        ["validate", str(sources.onnx), "--reference", str(sources.checkpoint), "--shapes", "1x4"],
    ):
        outcome = run_forked(argv, tmp_path, TIMEOUT_S)
        assert outcome.status == 0, f"{argv}: {outcome.describe()}"
