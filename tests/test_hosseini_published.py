"""Hosseini & Hosseini's optimised / efficient / super attention as their public code writes it
(tests/corpus_hosseini/published_style.py) fuses (issue 9, part 3).

Export as a user of that code must: ``W_a`` is ``nn.Linear(max_len, max_len)`` over the token axis
and the positions are ``arange(max_len)``, so T is static (= max_len) and only the batch is dynamic.
Then ``optimize`` (targets ort and portable) must leave one attention core per layer instead of the
per-head loop: over keys (the users' fix) a fused attention op, with SuperMix for super; over
queries (the published ``nn.Softmax(dim=1)``) one batched ``Softmax(axis=-2)``, never a softmax over
keys, which ``--explain`` reports as having no fused kernel. ORT equals eager PyTorch (fp32, 1e-5
relative to the output's scale) at two batch sizes. Near misses are left as they are.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

import attn2onnx
from attn2onnx import cli
from attn2onnx.io_spec import InputSpec
from attn2onnx.passes._ir_utils import count_ops
from attn2onnx.passes.explain import explain
from attn2onnx.passes.pipeline import optimize_model
from corpus_hosseini import published_style as ps
from plain_dcmha import run_ort

# ort: StandardAttention by default (passes/native_attention_table.json); ort-mha: native attention off
FUSED = {
    "ort": "ai.attn2onnx::StandardAttention",
    "ort-mha": "com.microsoft::MultiHeadAttention",
    "portable": "Attention",
}
BATCHES = (1, 3)
QUERIES = "softmax over queries: no fused kernel"
# (kind, shared W_a, softmax dim): every published module and its softmax-over-keys twin
CASES = [
    (kind, shared, dim)
    for kind in ps.KINDS
    for shared in ((True, False) if kind == "super" else (True,))
    for dim in (1, -1)
]


def _name(case: tuple) -> str:
    kind, shared, dim = case
    wa = ("-shared_wa" if shared else "-per_head_wa") if kind == "super" else ""
    return f"{kind}{wa}-{'queries' if dim == 1 else 'keys'}"


def _export(module: torch.nn.Module, path, mask: bool = False) -> onnx.ModelProto:
    """attn2onnx.export with T static (= max_len) and a dynamic batch."""
    specs = [InputSpec("x", ("batch", ps.MAX_LEN, ps.D), "float")]
    args = [torch.randn(2, ps.MAX_LEN, ps.D)]
    if mask:
        specs.append(InputSpec("key_padding_mask", ("batch", ps.MAX_LEN), "mask"))
        args.append(torch.ones(2, ps.MAX_LEN, dtype=torch.bool))
    attn2onnx.export(module, args, path, specs=specs, output_names=["y"])
    return onnx.load(path)


def _feeds(batch: int, mask: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch)
    feeds = {"x": rng.standard_normal((batch, ps.MAX_LEN, ps.D)).astype(np.float32)}
    if mask:
        keep = np.ones((batch, ps.MAX_LEN), dtype=bool)
        keep[-1, ps.MAX_LEN // 2 :] = False
        feeds["key_padding_mask"] = keep
    return feeds


def _check_parity(module: torch.nn.Module, graph: onnx.ModelProto, mask: bool = False) -> None:
    for batch in BATCHES:
        feeds = _feeds(batch, mask)
        with torch.no_grad():
            expected = module(*(torch.from_numpy(v) for v in feeds.values())).numpy()
        got = run_ort(graph, feeds)
        scale = float(np.abs(expected).max())
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * scale, err_msg=f"batch {batch}")


def _ops(graph: onnx.ModelProto) -> dict[str, int]:
    return count_ops(ir.serde.deserialize_model(graph))


def _batched(report) -> dict[str, int]:
    """What normalize_hosseini reported: batched loops by softmax axis (empty: nothing rewritten)."""
    return next(p for p in report.passes if p["pass"] == "normalize_hosseini")["fused"]


def _softmax_axes(graph: onnx.ModelProto) -> list[int]:
    return [a.i for n in graph.graph.node if n.op_type == "Softmax" for a in n.attribute if a.name == "axis"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """case -> (module, stock export), each made once."""
    cache: dict = {}

    def get(case: tuple):
        if case not in cache:
            kind, shared, dim = case
            torch.manual_seed(0)
            module = ps.SelfAttention(kind, shared_wa=shared, softmax_dim=dim).eval()
            cache[case] = module, _export(module, tmp_path_factory.mktemp("hosseini") / "stock.onnx")
        return cache[case]

    return get


def test_export_is_static_in_tokens_dynamic_in_batch(exported):
    _, stock = exported(("super", True, 1))
    (x,) = stock.graph.input
    dims = [d.dim_param or d.dim_value for d in x.type.tensor_type.shape.dim]
    assert dims == ["batch", ps.MAX_LEN, ps.D]


@pytest.mark.parametrize("target", list(FUSED))
@pytest.mark.parametrize("case", CASES, ids=_name)
def test_published_loop_becomes_one_core_with_parity(exported, case, target):
    kind, shared, dim = case
    module, stock = exported(case)
    assert _ops(stock)["Softmax"] == ps.H  # the published per-head loop
    graph, report = optimize_model(stock, target=target.removesuffix("-mha"), native=target != "ort-mha")
    ops = _ops(graph)
    over = "queries" if dim == 1 else "keys"
    assert _batched(report) == {f"batched head loop (softmax over {over})": 1}
    assert ops.get("Softmax", 0) + ops.get(FUSED[target], 0) == 1, ops  # one core per layer
    per_head_wa = kind == "super" and not shared  # each head's columns feed its own SuperMix, then one Concat
    assert ops.get("Slice", 0) == ops.get("Concat", 0) * ps.H == (ps.H if per_head_wa else 0), ops
    if dim == 1:
        assert ops.get(FUSED[target]) is None and _softmax_axes(graph) == [-2], ops  # never turned into keys
    else:
        assert ops[FUSED[target]] == 1 and "Softmax" not in ops, ops
    assert ops.get("ai.attn2onnx::SuperMix", 0) == ((1 if shared else ps.H) if kind == "super" else 0), ops
    if kind == "optimised" and dim == -1:
        assert ops["Split"] == 1 and ops["MatMul"] == 2, ops  # Q|K packed into one MatMul, then W_o
    _check_parity(module, graph)


@pytest.mark.parametrize("case", CASES, ids=_name)
def test_explain_reports_each_published_core(exported, case):
    _, stock = exported(case)
    outcomes = explain(stock, target="ort")
    assert len(outcomes) == ps.H
    for outcome in outcomes:
        if case[2] == 1:
            assert not outcome.fused and QUERIES in outcome.reason, outcome
        else:
            assert outcome.fused, outcome


def test_optimize_explain_cli_says_no_fused_kernel(exported, tmp_path, capsys):
    _, stock = exported(("super", True, 1))
    onnx.save(stock, tmp_path / "super.onnx")
    code = cli.main(["optimize", str(tmp_path / "super.onnx"), "-o", str(tmp_path / "opt.onnx"), "--explain"])
    out = capsys.readouterr().out
    assert code == 0 and f"attention cores: {ps.H}, fused 0" in out and out.count(QUERIES) == ps.H, out


def test_w_a_over_features_is_no_super_mix(tmp_path):
    """W_a over the head's channels is a value projection: no SuperMix, the loop not batched."""
    torch.manual_seed(0)
    module = ps.WaOverFeatures().eval()
    graph, report = optimize_model(_export(module, tmp_path / "features.onnx"), target="ort")
    ops = _ops(graph)
    assert "ai.attn2onnx::SuperMix" not in ops and not _batched(report), ops
    assert ops["com.microsoft::MultiHeadAttention"] == ps.H, ops  # each head fused on its own
    _check_parity(module, graph)


def test_masked_query_softmax_is_left_alone(tmp_path):
    """A mask and a softmax over queries: no batching, no fusion, and explain says why."""
    torch.manual_seed(0)
    module = ps.MaskedQuerySoftmax().eval()
    stock = _export(module, tmp_path / "masked.onnx", mask=True)
    graph, report = optimize_model(stock, target="ort")
    ops = _ops(graph)
    assert not _batched(report) and ops["Softmax"] == ps.H and _softmax_axes(graph) == [1] * ps.H, ops
    assert not any(k.startswith("com.microsoft") for k in ops), ops
    _check_parity(module, graph, mask=True)
    outcomes = explain(stock, target="ort")
    assert len(outcomes) == ps.H and all(not o.fused and QUERIES in o.reason for o in outcomes), outcomes
