"""Graphs deeper than Python's recursion limit (issue 19, item 7): ``optimize`` on a chain of
~1000 Adds died with RecursionError in fuse_dcmha's recursive leaf walk. Every graph walk of
the passes is now a loop or an explicit stack; each is driven here through a chain of DEPTH
nodes (5x the default recursion limit), and the Add chain through the whole pipeline of each
target."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from passes import cleanup, fuse_dcmha, fuse_dcmha_release, fuse_imhsa, normalize_hosseini, ort_stage
from passes._ir_utils import Builder
from passes._match import allowed_parts, is_all_true, uniform_const
from passes.pipeline import TARGETS, optimize_model

DEPTH = 5000


def graph_values(nodes: list, inputs: list, initializers: list = ()) -> dict[str, ir.Value]:
    """Every value of the graph made of ``nodes`` (shapes inferred) by name; the last node's
    output is the graph output."""
    last = nodes[-1].output[0]
    graph = helper.make_graph(nodes, "deep", inputs, [helper.make_empty_tensor_value_info(last)], list(initializers))
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model = ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto))
    values = {v.name: v for v in [*model.graph.inputs, *model.graph.initializers.values()]}
    values |= {out.name: out for node in model.graph for out in node.outputs}
    return values


def chain(op: str, first: str, extra: list[str] = (), **attributes) -> list:
    """DEPTH ``op`` nodes v0 = op(first, *extra), v1 = op(v0, *extra), ..."""
    names = [first] + [f"v{i}" for i in range(DEPTH)]
    return [helper.make_node(op, [a, *extra], [b], **attributes) for a, b in zip(names, names[1:])]


def const(name: str, array: np.ndarray):
    return numpy_helper.from_array(array, name)


def last(values: dict) -> ir.Value:
    return values[f"v{DEPTH - 1}"]


@pytest.fixture
def no_onnxscript_stages(monkeypatch):
    """The pipeline without its onnxscript stages (CleanupPass, the ORT fusion stage): they
    walk graphs without recursion too, but take ~30 ms per node, minutes at DEPTH."""
    skip = lambda self, model: ir.passes.PassResult(model, False)  # noqa: E731 - a stub
    monkeypatch.setattr(cleanup.CleanupPass, "call", skip)
    monkeypatch.setattr(ort_stage.OrtFusionStage, "call", skip)


@pytest.mark.parametrize("target", TARGETS)
def test_optimize_takes_a_deep_add_chain(no_onnxscript_stages, target):
    """Squeeze(axis 1) of DEPTH Adds on [B,1,N,T,S]: fuse_dcmha's compose leaves and the release
    form's grouped sum both walk the whole chain."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 3, 3])
    nodes = chain("Add", "x", ["x"]) + [helper.make_node("Squeeze", [f"v{DEPTH - 1}", "axis1"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "deep",
        [x],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 3, 3])],
        [const("axis1", np.array([1], np.int64))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    optimized, report = optimize_model(model, target)
    assert report.after.nodes == DEPTH + 1
    onnx.checker.check_model(optimized)


def test_and_chains_of_masks_decompose():
    tril = np.tril(np.ones((4, 4), bool))[None, None]
    values = graph_values(chain("And", "tril", ["tril"]), [], [const("tril", tril)])
    assert allowed_parts(last(values), None, 4, 4) == {"kpm": None, "causal": 1}


def test_expand_chains_of_constants_are_read():
    shape = const("shape", np.array([2, 2], np.int64))
    ones = graph_values(chain("Expand", "c", ["shape"]), [], [const("c", np.ones((1, 1), bool)), shape])
    assert is_all_true(last(ones))
    fill = graph_values(chain("Expand", "c", ["shape"]), [], [const("c", np.full((1, 1), -3.0, np.float32)), shape])
    assert uniform_const(last(fill)) == -3.0


def test_add_chains_of_mixing_matrices_decompose():
    values = graph_values(chain("Add", "w", ["w"]), [], [const("w", np.eye(3, dtype=np.float32))])
    pieces = fuse_dcmha._decompose_matrix(last(values), [])
    assert len(pieces) == DEPTH + 1 and {p.kind for p in pieces} == {"static"}


def test_cast_chains_of_lengths_and_ranges_are_read():
    to_int = {"to": TensorProto.INT64}
    values = graph_values(chain("Cast", "n", **to_int), [], [const("n", np.array(7, np.int64))])
    assert fuse_dcmha_release._length(last(values)) == 7
    arange = helper.make_node("Range", ["zero", "n", "one"], ["positions"])
    nodes = [arange, *chain("Cast", "positions", **to_int)]
    scalars = [const(name, np.array(v, np.int64)) for name, v in (("zero", 0), ("n", 5), ("one", 1))]
    values = graph_values(nodes, [], scalars)
    assert fuse_dcmha_release._from_zero(last(values)) is values["n"]


def test_cast_chains_of_mask_tables_are_views():
    table = np.tril(np.ones((4, 4), bool))
    values = graph_values(chain("Cast", "table", to=TensorProto.BOOL), [], [const("table", table)])
    view = fuse_dcmha_release._view(last(values))
    assert view is not None and view.axes == [0, 1] and np.array_equal(view.table, table)


def test_einsum_chains_drop_a_unit_axis():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 1, 3])
    nodes = chain("Einsum", "x", equation="abc->abc") + [helper.make_node("Identity", [f"v{DEPTH - 1}"], ["y"])]
    values = graph_values(nodes, [x])  # each Einsum used once
    out = last(values)
    dropped = fuse_dcmha_release._drop_axis(Builder(out.producer(), "test"), out, 1)
    assert list(dropped.shape) == [2, 3] and dropped.producer().attributes["equation"].value == "ac->ac"


def test_transpose_chains_of_constants_fold():
    table = np.arange(6, dtype=np.float32).reshape(2, 3)
    values = graph_values(chain("Transpose", "t", perm=[1, 0]), [], [const("t", table)])
    assert np.array_equal(fuse_imhsa._folded(last(values)), table.T if DEPTH % 2 else table)


def test_concat_trees_are_flattened():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 1])
    values = graph_values(chain("Concat", "x", ["x"], axis=2), [x])
    leaves = normalize_hosseini.concat_leaves(last(values).producer())
    assert len(leaves) == DEPTH + 1 and all(leaf is values["x"] for leaf in leaves)
