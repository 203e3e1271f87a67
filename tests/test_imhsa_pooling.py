"""The iMHSA pooling is decided from the graph (passes/fuse_imhsa.py, match_segment_pooling), with
no runtime inside the pass: the stock export of tests/plain_variants.py's segment pooling is
accepted, equivalent spellings of a step are accepted, any change of meaning is refused with a
NoMatch naming the step, and ``explain`` reports it for a near miss."""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from plain_dcmha import export_stock
from plain_variants import PlainImhsa, UnmaskedPoolImhsa

from attn2onnx.passes._match import NoMatch
from attn2onnx.passes.cleanup import CleanupPass
from attn2onnx.passes.explain import explain
from attn2onnx.passes.fuse_imhsa import core_end, match_landmark

D, LANDMARKS = 32, 3


@pytest.fixture(scope="module")
def stock(tmp_path_factory) -> bytes:
    """The cleaned stock export of PlainImhsa, serialised (each test edits its own copy)."""
    path = export_stock(PlainImhsa(D, 4, landmarks=LANDMARKS, seed=1), D, str(tmp_path_factory.mktemp("p") / "m.onnx"))
    model = ir.load(path)
    CleanupPass()(model)
    return ir.serde.serialize_model(model).SerializeToString()


def _model(stock: bytes) -> ir.Model:
    return ir.serde.deserialize_model(onnx.load_from_string(stock))


def _node(model: ir.Model, op_type: str, index: int = 0) -> ir.Node:
    return [n for n in model.graph if n.op_type == op_type][index]


def _core(model: ir.Model) -> ir.Node:
    return core_end(_node(model, "Softmax"))


def _set_const(node: ir.Node, index: int, array: np.ndarray) -> None:
    value = ir.Value(name=f"{node.name}_c{index}", const_value=ir.tensor(array))
    node.replace_input_with(index, value)


def _clip_as_max(model: ir.Model) -> None:
    clip = _node(model, "Clip")
    clip.op_type = "Max"


def _integer_division(model: ir.Model) -> None:
    """floor(float(a) / float(n)) -> a / n on integers (the op's body; equal on real tokens)."""
    floor = _node(model, "Floor")
    div = floor.inputs[0].producer()
    a, n = (x.producer().inputs[0] for x in div.inputs)  # the Casts to float
    int_div = ir.Node("", "Div", [a, n])
    int_div.outputs[0].dtype = ir.DataType.INT64
    model.graph.insert_before(floor, int_div)
    cast_back = next(iter(floor.outputs[0].uses())).node
    cast_back.replace_input_with(0, int_div.outputs[0])


EQUIVALENT: dict[str, Callable[[ir.Model], None]] = {
    "as_exported": lambda m: None,
    "max_for_clip": _clip_as_max,
    "integer_division": _integer_division,
}
CHANGED: dict[str, tuple[Callable[[ir.Model], None], str]] = {
    # segment = floor(rank * 4 / n): four segments' ids for three landmarks
    "other_landmark_count": (lambda m: _set_const(_node(m, "Mul"), 1, np.array(LANDMARKS + 1)), "rank \\* 3"),
    "reversed_cumsum": (
        lambda m: _node(m, "CumSum").attributes.__setitem__("reverse", ir.AttrInt64("reverse", 1)),
        "token ranks",
    ),
    "ids_not_arange": (lambda m: _set_const(_node(m, "Equal"), 1, np.array([[2], [1], [0]])), "arange\\(3\\)"),
    "count_over_batch": (lambda m: _set_const(_node(m, "ReduceSum"), 1, np.array([0])), "ReduceSum over axis 1"),
}


@pytest.mark.parametrize("name", list(EQUIVALENT))
def test_equivalent_pooling_is_accepted(stock, name):
    model = _model(stock)
    EQUIVALENT[name](model)
    assert match_landmark(_core(model)).landmarks == LANDMARKS


@pytest.mark.parametrize("name", list(CHANGED))
def test_changed_pooling_is_refused_with_the_step(stock, name):
    model = _model(stock)
    edit, step = CHANGED[name]
    edit(model)
    with pytest.raises(NoMatch, match=step):
        match_landmark(_core(model))


def test_explain_names_the_pooling_of_a_near_miss(tmp_path):
    path = export_stock(UnmaskedPoolImhsa(D, 4, landmarks=LANDMARKS, seed=5), D, str(tmp_path / "near.onnx"))
    outcomes = explain(onnx.load(path), target="ort")
    softmaxes = [o for o in outcomes if o.core.startswith("Softmax")]
    assert len(softmaxes) == 2 and not any(o.fused for o in softmaxes)
    assert all("weights = Cast(member) / max(count, 1)" in o.reason for o in softmaxes), outcomes
