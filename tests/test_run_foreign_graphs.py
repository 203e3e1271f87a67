"""``attn2onnx run`` on graphs it did not export and on fixed-shape graphs (issue 19, items 7
and 9): Hugging Face dim names and int64 inputs run on random inputs, a dim random inputs cannot
size and any ONNX Runtime failure while running are one line (exit 2), a fixed-shape graph runs
at its shape and says so, and a requested shape it cannot take is an error."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from attn2onnx import cli

HIDDEN = 4


def save(tmp_path, inputs, nodes, outputs, inits=(), name="m.onnx") -> str:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = str(tmp_path / name)
    onnx.save(model, path)
    return path


def hf_encoder(tmp_path, dims=("batch_size", "sequence_length")) -> str:
    """A BERT-like front: embeddings of input_ids and token_type_ids (a 1-row table, as
    RoBERTa's), times the int64 attention_mask; all [batch_size, sequence_length]."""
    names = ("input_ids", "attention_mask", "token_type_ids")
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, list(dims)) for n in names]
    out = helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, [*dims, HIDDEN])
    nodes = [
        helper.make_node("Gather", ["words", "input_ids"], ["w"]),
        helper.make_node("Gather", ["types", "token_type_ids"], ["t"]),
        helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "last"], ["m3"]),
        helper.make_node("Add", ["w", "t"], ["wt"]),
        helper.make_node("Mul", ["wt", "m3"], ["last_hidden_state"]),
    ]
    inits = [
        helper.make_tensor("words", TensorProto.FLOAT, [10, HIDDEN], np.arange(40, dtype=np.float32)),
        helper.make_tensor("types", TensorProto.FLOAT, [1, HIDDEN], np.ones(HIDDEN, np.float32)),
        helper.make_tensor("last", TensorProto.INT64, [1], [2]),
    ]
    return save(tmp_path, inputs, nodes, [out], inits)


def run(capfd, *argv: str) -> tuple[int, str, list[str]]:
    status = cli.main(["run", *argv])
    out, err = capfd.readouterr()
    return status, out, err.strip().splitlines()


def refused(capfd, *argv: str) -> str:
    status, _, err = run(capfd, *argv)
    assert status == 2 and len(err) == 1 and err[0].startswith("attn2onnx: error: "), (status, err)
    return err[0]


def test_hugging_face_dim_names_and_int64_inputs_run(tmp_path, capfd):
    path = hf_encoder(tmp_path)
    status, out, err = run(capfd, path, "--batch", "2", "--seq-len", "5", "-o", str(tmp_path / "o.npz"))
    assert status == 0, err
    assert np.load(tmp_path / "o.npz")["last_hidden_state"].shape == (2, 5, HIDDEN)
    assert "ids of unknown range fed as zeros: input_ids, token_type_ids" in out
    status, out, err = run(capfd, path)
    assert status == 0 and "last_hidden_state: shape [1, 16, 4]" in out, err


def test_unnamed_dims_are_batch_then_sequence(tmp_path, capfd):
    path = hf_encoder(tmp_path, dims=("N", "d1"))
    status, out, err = run(capfd, path, "--batch", "3", "--seq-len", "2")
    assert status == 0 and "last_hidden_state: shape [3, 2, 4]" in out, err


def test_given_int64_ids_of_unknown_range_are_taken(tmp_path, capfd):
    path = hf_encoder(tmp_path)
    ids = np.array([[1, 9, 3]], np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    np.savez(tmp_path / "in.npz", **feeds)
    status, out, err = run(capfd, path, "--inputs", str(tmp_path / "in.npz"))
    assert status == 0, err


def test_a_third_dynamic_dim_asks_for_inputs(tmp_path, capfd):
    dims = ["batch_size", "num_heads_dyn", "past_sequence_length"]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)
    path = save(tmp_path, [x], [helper.make_node("Identity", ["x"], ["y"])], [y])
    assert "'past_sequence_length'" in refused(capfd, path) and "pass --inputs" in refused(capfd, path)


def test_ort_failure_while_running_is_one_line(tmp_path, capfd):
    """ORT loads the graph but cannot run it at seq 16 (a Reshape to a fixed size): one line,
    without ORT's own log of the failure."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])
    shape = helper.make_tensor("shape", TensorProto.INT64, [1], [3])
    path = save(tmp_path, [x], [helper.make_node("Reshape", ["x", "shape"], ["y"])], [y], [shape])
    assert "ONNX Runtime failed to run it" in refused(capfd, path)


@pytest.fixture
def static_graph(tmp_path) -> str:
    """x [1, 32, 4] -> Identity: the graph of an export --static --batch 1 --seq-len 32."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32, HIDDEN])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, HIDDEN])
    return save(tmp_path, [x], [helper.make_node("Identity", ["x"], ["y"])], [y])


@pytest.mark.parametrize(
    "asked", [["--batch", "4", "--seq-len", "7"], ["--batch", "4"], ["--seq-len", "7"]], ids=" ".join
)
def test_static_graph_refuses_a_shape_it_cannot_take(static_graph, capfd, asked):
    line = refused(capfd, static_graph, *asked)
    assert "fixed shape 1x32" in line and asked[0] in line


def test_static_graph_runs_at_its_shape_and_says_so(static_graph, capfd):
    for asked in ([], ["--batch", "1", "--seq-len", "32"]):
        status, out, err = run(capfd, static_graph, *asked)
        assert status == 0, err
        assert "random inputs at the model's fixed shape 1x32" in out and "y: shape [1, 32, 4]" in out
