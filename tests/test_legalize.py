"""Exports that load (issue 10, part 3): the legalisation pass casts index inputs that the ONNX
spec rejects to int64, in the main graph, subgraphs and functions; the exporter runs it right
after torch.onnx.export and every optimize target runs it first. A type error it cannot repair
is a one-line LegalizeError that names the node."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto as TP
from torch import nn

import attn2onnx
from attn2onnx.passes import build_passes
from attn2onnx.passes.legalize import LegalizeError, LegalizePass, legalize


def loads(model: onnx.ModelProto) -> ort.InferenceSession:
    """The model passes onnx.checker (full_check) and ONNX Runtime loads it."""
    onnx.checker.check_model(model, full_check=True)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def legalized(model: onnx.ModelProto) -> onnx.ModelProto:
    irm = ir.serde.deserialize_model(model)
    legalize(irm)
    return ir.serde.serialize_model(irm)


def make_model(nodes, inputs, outputs, initializers=(), functions=()) -> onnx.ModelProto:
    graph = oh.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    opsets = [oh.make_opsetid("", 23)] + [oh.make_opsetid(f.domain, 1) for f in functions]
    return oh.make_model(graph, opset_imports=opsets, functions=list(functions))


def tensor(name, elem, shape):
    return oh.make_tensor_value_info(name, elem, shape)


def const(name, values, dtype) -> onnx.TensorProto:
    return onnx.numpy_helper.from_array(np.array(values, dtype=dtype), name)


# -- torch modules whose stock export carries int32 indices ---------------------------------
class ArangeIndex(nn.Module):
    """Advanced indexing with torch.arange(T, dtype=int32): GatherND with int32 indices."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, torch.arange(x.shape[1], dtype=torch.int32).flip(0)]


class ArangeIndexPut(nn.Module):
    """index_put with int32 indices: ScatterND with int32 indices."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_put((torch.arange(x.shape[0], dtype=torch.int32).flip(0),), 2 * x)


class ArangeIndexSelect(nn.Module):
    """index_select with int32 indices: Gather (int32 allowed; stays valid)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.index_select(x, 1, torch.arange(x.shape[1], dtype=torch.int32).flip(0))


class Int32Gather(nn.Module):
    """torch.gather / scatter with int32 indices: GatherElements / ScatterElements."""

    def __init__(self, scatter: bool) -> None:
        super().__init__()
        self.scatter = scatter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = torch.arange(x.shape[2], dtype=torch.int32).flip(0).expand_as(x)
        return torch.zeros_like(x).scatter(2, index, x) if self.scatter else torch.gather(x, 2, index)


@pytest.mark.parametrize(
    "module,op",
    [
        (ArangeIndex(), "GatherND"),
        (ArangeIndexPut(), "ScatterND"),
        (ArangeIndexSelect(), "Gather"),
        (Int32Gather(scatter=False), "GatherElements"),
        (Int32Gather(scatter=True), "ScatterElements"),
    ],
    ids=["gathernd", "scatternd", "gather", "gatherelements", "scatterelements"],
)
def test_int32_index_exports_load_in_ort(tmp_path, module, op):
    x = torch.randn(2, 6, 5)
    result = attn2onnx.export(module, (x,), tmp_path / "m.onnx")
    proto = onnx.load(str(result.path))
    assert op in {n.op_type for n in proto.graph.node}
    session = loads(proto)
    for shape in ((2, 6, 5), (3, 4, 5)):
        x = torch.randn(*shape)
        np.testing.assert_allclose(session.run(None, {"input_0": x.numpy()})[0], module(x).numpy(), rtol=1e-6)


# -- hand-built graphs: each op, subgraphs, functions, files ----------------------------------
def gathernd(indices_type=TP.INT32) -> onnx.ModelProto:
    return make_model(
        [oh.make_node("GatherND", ["x", "i"], ["y"], name="pick")],
        [tensor("x", TP.FLOAT, [3, 4]), tensor("i", indices_type, [2, 1])],
        [tensor("y", TP.FLOAT, [2, 4])],
    )


X = np.arange(12, dtype=np.float32).reshape(3, 4)

CASES = {
    # name: (model, feeds, expected output)
    "gathernd-int32-input": (gathernd(), {"x": X, "i": np.array([[2], [0]], np.int32)}, X[[2, 0]]),
    "scatternd-int32": (
        make_model(
            [oh.make_node("ScatterND", ["x", "i", "u"], ["y"])],
            [tensor("x", TP.FLOAT, [3, 4]), tensor("u", TP.FLOAT, [1, 4])],
            [tensor("y", TP.FLOAT, [3, 4])],
            [const("i", [[1]], np.int32)],
        ),
        {"x": X, "u": np.ones((1, 4), np.float32)},
        np.where(np.arange(3)[:, None] == 1, 1.0, X),
    ),
    "gather-int16": (
        make_model(
            [oh.make_node("Gather", ["x", "i"], ["y"], axis=1)],
            [tensor("x", TP.FLOAT, [3, 4])],
            [tensor("y", TP.FLOAT, [3, 2])],
            [const("i", [3, 0], np.int16)],
        ),
        {"x": X},
        X[:, [3, 0]],
    ),
    "gatherelements-int16": (
        make_model(
            [oh.make_node("GatherElements", ["x", "i"], ["y"], axis=1)],
            [tensor("x", TP.FLOAT, [3, 4]), tensor("i", TP.INT16, [3, 1])],
            [tensor("y", TP.FLOAT, [3, 1])],
        ),
        {"x": X, "i": np.array([[1], [2], [3]], np.int16)},
        X[[0, 1, 2], [1, 2, 3]][:, None],
    ),
    "scatterelements-uint8": (
        make_model(
            [oh.make_node("ScatterElements", ["x", "i", "u"], ["y"], axis=1)],
            [tensor("x", TP.FLOAT, [3, 4]), tensor("u", TP.FLOAT, [3, 1])],
            [tensor("y", TP.FLOAT, [3, 4])],
            [const("i", [[0], [0], [0]], np.uint8)],
        ),
        {"x": X, "u": np.zeros((3, 1), np.float32)},
        np.where(np.arange(4) == 0, 0.0, X),
    ),
    "slice-mixed-int32-int64": (
        make_model(
            [oh.make_node("Slice", ["x", "s", "e", "a"], ["y"])],
            [tensor("x", TP.FLOAT, [3, 4])],
            [tensor("y", TP.FLOAT, [3, 2])],
            [const("s", [1], np.int32), const("e", [3], np.int64), const("a", [1], np.int64)],
        ),
        {"x": X},
        X[:, 1:3],
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_invalid_index_types_are_cast_to_int64(name):
    model, feeds, expected = CASES[name]
    with pytest.raises((onnx.checker.ValidationError, onnx.shape_inference.InferenceError)):
        onnx.checker.check_model(model, full_check=True)  # the case really is invalid
    fixed = legalized(model)
    np.testing.assert_array_equal(loads(fixed).run(None, feeds)[0], expected)


def test_subgraphs_are_legalised():
    branch = oh.make_graph(
        [oh.make_node("GatherND", ["x", "i"], ["b"], name="inner")], "then", [], [tensor("b", TP.FLOAT, [2, 4])]
    )
    other = oh.make_graph(
        [oh.make_node("Slice", ["x", "zero", "two"], ["c"])], "else", [], [tensor("c", TP.FLOAT, [2, 4])]
    )
    model = make_model(
        [oh.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=other)],
        [tensor("x", TP.FLOAT, [3, 4]), tensor("i", TP.INT32, [2, 1]), tensor("cond", TP.BOOL, [])],
        [tensor("y", TP.FLOAT, [2, 4])],
        [const("zero", [0], np.int64), const("two", [2], np.int64)],
    )
    session = loads(legalized(model))
    feeds = {"x": X, "i": np.array([[2], [0]], np.int32)}
    np.testing.assert_array_equal(session.run(None, {**feeds, "cond": np.array(True)})[0], X[[2, 0]])
    np.testing.assert_array_equal(session.run(None, {**feeds, "cond": np.array(False)})[0], X[:2])


def test_functions_are_legalised():
    body = [oh.make_node("Cast", ["idx"], ["idx32"], to=TP.INT32), oh.make_node("GatherND", ["data", "idx32"], ["out"])]
    function = oh.make_function("local", "Pick", ["data", "idx"], ["out"], body, [oh.make_opsetid("", 23)])
    function.value_info.append(tensor("idx32", TP.INT32, None))
    model = make_model(
        [oh.make_node("Pick", ["x", "i"], ["y"], domain="local")],
        [tensor("x", TP.FLOAT, [3, 4]), tensor("i", TP.INT64, [2, 1])],
        [tensor("y", TP.FLOAT, [2, 4])],
        functions=[function],
    )
    session = loads(legalized(model))
    np.testing.assert_array_equal(session.run(None, {"x": X, "i": np.array([[2], [0]])})[0], X[[2, 0]])


def test_valid_model_is_left_alone():
    model = ir.serde.deserialize_model(gathernd(TP.INT64))
    result = LegalizePass()(model)
    assert not result.modified and [n.op_type for n in model.graph] == ["GatherND"]


def test_unrepairable_type_error_names_the_node():
    """Mod's inputs share a type with its output: a cast would change the result type."""
    model = make_model(
        [oh.make_node("Mod", ["a", "b"], ["y"], name="wrap_pos")],
        [tensor("a", TP.INT32, [4]), tensor("b", TP.INT64, [4])],
        [tensor("y", TP.INT64, [4])],
    )
    with pytest.raises(LegalizeError, match="node 'wrap_pos' \\(Mod\\): input 1 is tensor\\(int64\\)") as caught:
        legalized(model)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("target", ["ort", "portable"])
def test_optimize_legalises_any_file_first(tmp_path, target):
    assert build_passes(target)[0][0] == "legalize"
    onnx.save(CASES["slice-mixed-int32-int64"][0], tmp_path / "in.onnx")
    attn2onnx.optimize(tmp_path / "in.onnx", tmp_path / "out.onnx", target=target)
    session = loads(onnx.load(str(tmp_path / "out.onnx")))
    np.testing.assert_array_equal(session.run(None, {"x": X})[0], X[:, 1:3])
