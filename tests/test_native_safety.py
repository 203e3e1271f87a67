"""The native kernel library never crashes the process that loads it (issue 19).

Every case of tests/fuzz/native_cases.py (empty and missing input names, wrong ranks, dtypes and
shapes, zero sizes, T > S and S > T on both kernel paths, huge and ill-typed attributes, every
attn_mask form) in a plain ONNX Runtime session with the regular build: it runs with the
contract's output shape or ends in an ORT error, never in a signal. The same cases run under the
sanitizers in tests/test_native_sanitized.py. And the command that crashed: ``attn2onnx run`` on
an exported model whose optional attn_mask input is written as "" (SIGSEGV before) runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import skip_or_fail
from fuzz import native_cases
from fuzz.harness import run_forked

from attn2onnx import cli
from attn2onnx.runtime import native


@pytest.fixture(scope="module")
def library() -> Path:
    reason = native.unavailable_reason()
    if reason is not None:
        skip_or_fail(f"native kernel library unavailable: {reason}")
    return native.library_path()


def test_every_kernel_case_runs_or_is_refused(library):
    broken = native_cases.failures(native_cases.run_cases(library))
    assert not broken, "\n".join(f"{case}: {'; '.join(found)}" for case, found in broken.items())


def test_run_command_treats_an_empty_attn_mask_name_as_absent(library, tmp_path):
    """The issue's reproduction: exit 0 and the same logits as the model without the 8th input."""
    checkpoint, plain, empty = tmp_path / "tiny.pt", tmp_path / "tiny.onnx", tmp_path / "tiny8.onnx"
    new = ["new", "dcmha", "-o", str(checkpoint), "--layers", "1", "--d-model", "16", "--heads", "2", "--max-len", "16"]
    assert cli.main(new) == 0
    assert cli.main(["export", str(checkpoint), "-o", str(plain), "--no-check", "--batch", "1", "--seq-len", "4"]) == 0
    model = onnx.load(plain)
    (node,) = [n for n in model.graph.node if n.op_type == "DcmhaAttention"]
    assert len(node.input) == 7
    node.input.append("")
    onnx.checker.check_model(model)
    onnx.save(model, empty)
    feeds = tmp_path / "in.npz"
    np.savez(feeds, input_ids=np.array([[1, 5, 2, 7, 3]], np.int64), key_padding_mask=np.ones((1, 5), bool))
    logits = {}
    for path in (plain, empty):
        out = tmp_path / f"{path.stem}.npz"
        outcome = run_forked(["run", str(path), "--inputs", str(feeds), "-o", str(out)], tmp_path, timeout=300)
        assert outcome.signal is None and outcome.status == 0, outcome.describe()
        with np.load(out) as saved:
            logits[path] = saved["logits"]
    np.testing.assert_array_equal(logits[empty], logits[plain])
