"""Fusions inside ONNX functions and subgraphs (issue 13 part 4, issue 9 part 4).

Each stock export (plain attention lowered or fused to MultiHeadAttention, plain DCMHA, super's
token mix) is moved into (a) a model-local function the main graph calls, (b) the then-branch of
an If, (c) the body of a Loop. After ``optimize --target ort`` the fused op sits inside that
function or subgraph, the model passes ``onnx.checker`` and ORT gives the unoptimised model's
outputs at two dynamic shapes. The bodies of our own ops (``ai.attn2onnx`` functions) are never
rewritten.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import helper

import corpus
from plain_dcmha import RankEinsumStyle, export_stock, random_feeds, run_ort

from attn2onnx.custom_ops import function_protos
from attn2onnx.exporter import to_onnx
from attn2onnx.io_spec import InputSpec
from attn2onnx.passes import optimize_model
from attn2onnx.passes._ir_utils import DOMAIN, count_ops
from attn2onnx.variants import build_attention

D, N = 32, 4
SHAPES = [(1, 5), (3, 16)]
LOCAL = "test.local"
MHA = "com.microsoft::MultiHeadAttention"
# model -> the ops the ort pipeline must make where the attention lives
NATIVE = f"{DOMAIN}::StandardAttention"  # ort's default for plain cores (passes/native_attention_table.json)
FUSED = {
    "mha": {NATIVE: 1},  # this project's mha variant: lower_attention
    "corpus": {MHA: 1},  # GPT-2 style (HF) attention, its additive mask a bias: fuse_standard_attention
    "dcmha": {f"{DOMAIN}::DcmhaAttention": 1},
    "super": {f"{DOMAIN}::SuperMix": 1, NATIVE: 1},
}


def _variant(name: str, **options) -> onnx.ModelProto:
    """Stock export (standard ops only) of one attention layer of the ``name`` variant."""
    torch.manual_seed(0)
    module = build_attention(name, d_model=D, n_heads=N, causal=True, max_len=32, **options).eval()
    with torch.no_grad():  # non-trivial WA for super (a fresh one is the identity)
        if hasattr(module, "wa"):
            module.wa.add_(0.1 * torch.randn_like(module.wa))
    specs = [InputSpec("x", ("batch", "seq", D), "float"), InputSpec("key_padding_mask", ("batch", "seq"), "mask")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = (torch.randn(2, 8, D), torch.ones(2, 8, dtype=torch.bool))
        return to_onnx(module, args, specs, output_names=["y"], custom=False, max_seq=32)


def _stock(name: str, folder) -> onnx.ModelProto:
    if name == "corpus":
        entry = next(e for e in corpus.ENTRIES if e.name == "gpt2_hf_causal_padding")
        return corpus.export(entry, corpus.build(entry))
    if name == "dcmha":
        module = RankEinsumStyle(d_model=D, n_heads=N, rank=2, seed=1, causal=True, static_mix=True)
        return onnx.load(export_stock(module, D, str(folder / "dcmha.onnx")))
    return _variant(name)


@pytest.fixture(scope="module")
def stock(tmp_path_factory):
    """name -> stock export, made once per module."""
    cache: dict[str, onnx.ModelProto] = {}
    folder = tmp_path_factory.mktemp("scopes")

    def get(name: str) -> onnx.ModelProto:
        if name not in cache:
            cache[name] = _stock(name, folder)
        return cache[name]

    return get


# -- moving a graph's nodes into a function / an If branch / a Loop body ---------------------------
def _constants(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The initializers as Constant nodes (a function has no initializers)."""
    return [helper.make_node("Constant", [], [t.name], value=t) for t in graph.initializer]


def _model(model: onnx.ModelProto, graph: onnx.GraphProto, functions=(), opsets=None) -> onnx.ModelProto:
    out = helper.make_model(
        graph, opset_imports=list(model.opset_import) + list(opsets or []), functions=list(functions)
    )
    out.ir_version = max(model.ir_version, 10)  # function value_info needs IR 10
    return out


def in_function(model: onnx.ModelProto) -> onnx.ModelProto:
    """The whole graph (initializers as Constant nodes, shapes kept) as function ``test.local::Block``,
    called once by the main graph."""
    g = model.graph
    func = helper.make_function(
        LOCAL,
        "Block",
        [v.name for v in g.input],
        [v.name for v in g.output],
        _constants(g) + list(g.node),
        list(model.opset_import),
    )
    func.value_info.extend(list(g.input) + list(g.value_info))
    call = helper.make_node("Block", [v.name for v in g.input], [v.name for v in g.output], "block", domain=LOCAL)
    main = helper.make_graph([call], "main", list(g.input), list(g.output))
    return _model(model, main, [func], [helper.make_opsetid(LOCAL, 1)])


def _branch(model: onnx.ModelProto, name: str) -> onnx.GraphProto:
    """The graph's nodes as a subgraph with no inputs (x, the mask and the weights from the
    outer scope), its output renamed ``<output>_<name>``."""
    g = model.graph
    body = onnx.GraphProto()
    body.CopyFrom(g)
    body.name = name
    del body.input[:], body.initializer[:]
    renamed = {o.name: f"{o.name}_{name}" for o in g.output}
    for node in body.node:
        node.output[:] = [renamed.get(o, o) for o in node.output]
    for out in body.output:
        out.name = renamed[out.name]
    return body


def in_if(model: onnx.ModelProto) -> onnx.ModelProto:
    """``y = If(cond, then: the graph, else: x)``, with ``cond`` a new bool input."""
    g = model.graph
    (y,) = g.output
    x = g.input[0].name
    other = helper.make_graph([helper.make_node("Identity", [x], [f"{y.name}_else"])], "else", [], [])
    other.output.extend([helper.make_tensor_value_info(f"{y.name}_else", y.type.tensor_type.elem_type, None)])
    node = helper.make_node("If", ["cond"], [y.name], then_branch=_branch(model, "then"), else_branch=other)
    cond = helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, [])
    main = helper.make_graph([node], "main", list(g.input) + [cond], list(g.output), list(g.initializer))
    return _model(model, main)


def in_loop(model: onnx.ModelProto) -> onnx.ModelProto:
    """A Loop of one trip whose body computes the graph (carried value: x in, y out)."""
    g = model.graph
    (y,) = g.output
    x = g.input[0]
    body = _branch(model, "body")
    carried = onnx.ValueInfoProto()
    carried.CopyFrom(x)
    carried.name = "carried"
    body.input.extend([helper.make_tensor_value_info("i", onnx.TensorProto.INT64, []), _bool("c_in"), carried])
    body.node.append(helper.make_node("Identity", ["c_in"], ["c_out"]))
    body.output.insert(0, _bool("c_out"))
    trips = helper.make_tensor("trips", onnx.TensorProto.INT64, [], [1])
    node = helper.make_node("Loop", ["trips", "", x.name], [y.name], body=body)
    main = helper.make_graph([node], "main", list(g.input), list(g.output), list(g.initializer) + [trips])
    return _model(model, main)


def _bool(name: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, onnx.TensorProto.BOOL, [])


PLACES = {"function": in_function, "if": in_if, "loop": in_loop}


# -- checks -------------------------------------------------------------------------------------------
def inner_nodes(model: onnx.ModelProto, place: str) -> list[onnx.NodeProto]:
    """The nodes where the attention lives: the function's body, the If's then-branch, the Loop's body."""
    if place == "function":
        (block,) = [f for f in model.functions if f.domain == LOCAL]
        return list(block.node)
    (node,) = [n for n in model.graph.node if n.op_type in ("If", "Loop")]
    attr = "then_branch" if place == "if" else "body"
    return list(helper.get_attribute_value(next(a for a in node.attribute if a.name == attr)).node)


def inner_counts(model: onnx.ModelProto, place: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in inner_nodes(model, place):
        key = node.op_type if node.domain == "" else f"{node.domain}::{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def assert_same_outputs(before: onnx.ModelProto, after: onnx.ModelProto, names: set[str]) -> None:
    for seed, (batch, seq) in enumerate(SHAPES):
        feeds = {k: v for k, v in random_feeds(batch, seq, D, seed=seed).items() if k in names}
        for cond in [True, False] if "cond" in names else [None]:
            if cond is not None:
                feeds["cond"] = np.array(cond)
            np.testing.assert_allclose(run_ort(after, feeds), run_ort(before, feeds), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("place", list(PLACES))
@pytest.mark.parametrize("name", list(FUSED))
def test_fuses_inside(stock, name, place):
    model = PLACES[place](stock(name))
    onnx.checker.check_model(model, full_check=True)
    optimised, report = optimize_model(model, target="ort")
    counts = inner_counts(optimised, place)
    assert FUSED[name].items() <= counts.items(), counts
    assert "Softmax" not in counts, counts
    onnx.checker.check_model(optimised, full_check=True)
    assert_same_outputs(model, optimised, {v.name for v in model.graph.input})
    _, again = optimize_model(optimised, target="ort")
    assert not any(p["changed"] for p in again.passes), again.passes


def test_fused_op_domain_imported_by_the_function(stock):
    """A fused node in a function needs the function's own opset import of its domain."""
    optimised, _ = optimize_model(in_function(stock("dcmha")), target="ort")
    (block,) = [f for f in optimised.functions if f.domain == LOCAL]
    assert DOMAIN in {o.domain for o in block.opset_import}
    assert any(n.domain == DOMAIN for n in block.node)
    assert not optimised.graph.initializer  # the function's new constants are Constant nodes in it


def test_own_op_bodies_untouched(stock):
    """The ai.attn2onnx op bodies attached by the fusions are the op set's, node for node (their
    Softmax core is never lowered to MultiHeadAttention)."""
    optimised, _ = optimize_model(in_function(stock("dcmha")), target="ort")
    bodies = {f.name: f for f in optimised.functions if f.domain == DOMAIN}
    assert {"DcmhaAttention", "DcmhaCompose"} <= set(bodies)
    protos = function_protos()
    for name, body in bodies.items():
        assert body.SerializeToString(deterministic=True) == protos[name].SerializeToString(deterministic=True), name
    total = count_ops(ir.serde.deserialize_model(optimised))
    assert "com.microsoft::MultiHeadAttention" not in total and total[f"{DOMAIN}::DcmhaAttention"] == 1


def test_explain_sees_inside_functions(stock):
    """``optimize --explain`` lists the core inside the function, and says it fused."""
    from attn2onnx.passes.explain import explain

    outcomes = explain(in_function(stock("corpus")), target="ort")
    assert len(outcomes) == 1 and outcomes[0].fused, [str(o) for o in outcomes]
