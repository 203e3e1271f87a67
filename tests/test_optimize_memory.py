"""``optimize`` holds a small multiple of the model's weights (issue 19, item 8).

It held six copies of a model's inline weights at its peak: the op checks serialized the model
and ONNX shape inference copied it twice more, the command kept its first parse alive beside
the pipeline's, the ORT stage and ``--explain`` copied the model through a serialize /
deserialize round trip, and the writer built the whole message and its bytes. Now the weights
are parsed once (the structure checker's own parse freed first), checks and trial copies see
them without copying (:mod:`attn2onnx.lean_proto`) and the writer emits one at a time.
benchmarks/optimize_memory.py measures the same at 1 GiB (RESULTS.md "Optimize memory").
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from attn2onnx.lean_proto import independent_copy, save_inline
from attn2onnx.onnx_io import load_ir
from peak_rss import available, cli_peak_rss
from test_cli_basic import call

D = 512  # each weight is [D, D] float32: 1 MiB


def chain(path, layers: int, external: bool) -> int:
    """``y = x @ w0 @ w1 ...`` with ``layers`` 1 MiB weights (in ``path``.data when ``external``)
    and a small ``bias``; returns the weight bytes."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((D, D), np.float32) * 0.01, f"w{i}") for i in range(layers)]
    inits.append(numpy_helper.from_array(np.ones(D, np.float32), "bias"))
    names = ["x"] + [f"h{i}" for i in range(layers)]
    nodes = [helper.make_node("MatMul", [a, f"w{i}"], [b]) for i, (a, b) in enumerate(zip(names, names[1:]))]
    nodes.append(helper.make_node("Add", [names[-1], "bias"], ["y"]))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", D])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", D])
    model = helper.make_model(
        helper.make_graph(nodes, "chain", [x], [y], inits), opset_imports=[helper.make_opsetid("", 21)]
    )
    if external:
        onnx.save(model, path, save_as_external_data=True, location=os.path.basename(path) + ".data")
    else:
        onnx.save(model, path)
    return layers * D * D * 4


def optimize_peak_rss(path) -> int:
    """Peak resident bytes of ``attn2onnx optimize`` on ``path`` (in a child, as it measured it)."""
    status, peak, err = cli_peak_rss(["optimize", str(path), "-o", f"{path}.out.onnx"])
    assert status == 0, err
    return peak


@pytest.mark.skipif(not available(), reason="no /proc/self/status to read a process's peak resident size from")
def test_optimize_holds_a_small_multiple_of_inline_weights(tmp_path):
    """32 MiB of inline weights: the peak above a 1 MiB model's was 6x the weights, now about 2x
    (the parse: the file's bytes and the message). The bound leaves room for allocator noise."""
    chain(tmp_path / "small.onnx", 1, False)
    floor = optimize_peak_rss(tmp_path / "small.onnx")
    weights = chain(tmp_path / "model.onnx", 32, False)
    excess = (optimize_peak_rss(tmp_path / "model.onnx") - floor) / weights
    assert excess < 3.5, f"optimize held {excess:.1f}x the model's weights above the 1 MiB model's peak"


def test_save_inline_writes_what_it_was_given(tmp_path):
    """The weights written one at a time after the rest parse back as the same model."""
    chain(tmp_path / "model.onnx", 3, False)
    model = load_ir(tmp_path / "model.onnx")
    save_inline(model, tmp_path / "copy.onnx")
    onnx.checker.check_model(str(tmp_path / "copy.onnx"), full_check=True)
    before, after = onnx.load(tmp_path / "model.onnx"), onnx.load(tmp_path / "copy.onnx")
    as_dict = lambda m: {t.name: numpy_helper.to_array(t).tobytes() for t in m.graph.initializer}  # noqa: E731
    assert as_dict(after) == as_dict(before)
    x = np.random.default_rng(1).standard_normal((2, D), np.float32)
    run = lambda p: ort.InferenceSession(str(p)).run(None, {"x": x})[0]  # noqa: E731
    np.testing.assert_array_equal(run(tmp_path / "copy.onnx"), run(tmp_path / "model.onnx"))


def test_independent_copy_shares_bytes_not_names(tmp_path):
    """Renaming a value of the copy (the onnxscript optimizer does) leaves the original's
    tensor names alone; external weights stay references to the model's file."""
    chain(tmp_path / "model.onnx", 2, True)
    model = load_ir(tmp_path / "model.onnx")
    copy = independent_copy(model)
    copy.graph.initializers["w0"].name = "renamed"
    assert model.graph.initializers["w0"].const_value.name == "w0"
    tensor = copy.graph.initializers["renamed"].const_value
    assert tensor.base_dir == model.graph.initializers["w0"].const_value.base_dir
    np.testing.assert_array_equal(tensor.numpy(), model.graph.initializers["w0"].const_value.numpy())


def test_explain_reads_external_weights_given_a_relative_path(capsys, tmp_path, monkeypatch):
    """``optimize sub/m.onnx --explain`` looked for the weights in the current folder (its
    serialize / deserialize copy lost the model's folder): 'No such file or directory'."""
    os.mkdir(tmp_path / "sub")
    chain(tmp_path / "sub" / "m.onnx", 2, True)
    monkeypatch.chdir(tmp_path)
    status, out, err = call(capsys, "optimize", os.path.join("sub", "m.onnx"), "-o", "out.onnx", "--explain")
    assert status == 0, err
    assert "attention cores: 0" in out
