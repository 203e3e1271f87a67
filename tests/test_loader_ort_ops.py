"""The loader accepts what ONNX Runtime runs (issue 20, item 3): ``optimize --target ort`` turns
an RMSNorm into SimplifiedLayerNormalization, an op ORT registers in the default domain that
onnx.checker does not know, and ``run`` / ``validate`` / ``runtime.session`` refused the tool's own
output. Such nodes are checked against ORT's schemas instead (attn2onnx.ort_schemas); a damaged
file is still refused, and every optimize target's output of every corpus model loads."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import corpus
from corpus import styles as st
from plain_dcmha import run_ort
from test_cli_basic import assert_one_line_error, call

from attn2onnx import UsageError
from attn2onnx.onnx_io import load_onnx, save_model
from attn2onnx.passes import optimize_model
from attn2onnx.runtime import session

ORT_ONLY = "SimplifiedLayerNormalization"  # default domain, ORT's own: unknown to onnx.checker


class LlamaRMSNorm(nn.Module):
    """RMSNorm as Hugging Face's Llama writes it: x * rsqrt(mean(x^2) + eps) * w, in fp32."""

    def __init__(self, d_model: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.2 * torch.randn(d_model))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps)).to(dtype)


class LlamaBlock(nn.Module):
    """A pre-norm decoder block: Llama's RMSNorm and eager attention, then torch's nn.RMSNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.attn_norm = LlamaRMSNorm(st.D)
        self.attn = st.LlamaEager()
        self.mlp_norm = nn.RMSNorm(st.D, eps=1e-6)
        self.mlp = nn.Linear(st.D, st.D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attn(self.attn_norm(x))
        return h + self.mlp(self.mlp_norm(h))


@pytest.fixture(scope="module")
def rmsnorm(tmp_path_factory) -> dict[str, Path]:
    """The block saved as a .pt2 program, exported at opset 20 (as a user's Llama is) and
    optimised for ORT without native attention: {"pt2", "stock", "ours"}."""
    from attn2onnx import cli

    folder = tmp_path_factory.mktemp("rmsnorm")
    files = {"pt2": folder / "m.pt2", "stock": folder / "stock.onnx", "ours": folder / "ours.onnx"}
    torch.manual_seed(0)
    batch, seq = torch.export.Dim("batch", max=8), torch.export.Dim("seq", max=64)
    program = torch.export.export(LlamaBlock().eval(), (torch.randn(2, 8, st.D),), dynamic_shapes=({0: batch, 1: seq},))
    torch.export.save(program, files["pt2"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(["export", str(files["pt2"]), "-o", str(files["stock"]), "--opset", "20"]) == 0
    # com.microsoft ops only (MultiHeadAttention too): the contrib op checks below
    flags = ["--target", "ort", "--no-native-attention"]
    assert cli.main(["optimize", str(files["stock"]), "-o", str(files["ours"]), *flags]) == 0
    ops = {n.op_type for n in onnx.load(files["ours"]).graph.node}
    assert ORT_ONLY in ops, f"the ort target no longer emits {ORT_ONLY}: these tests check nothing ({ops})"
    with pytest.raises(onnx.checker.ValidationError, match=f"No Op registered for {ORT_ONLY}"):
        onnx.checker.check_model(str(files["ours"]))
    return files


def test_run_accepts_the_ort_target_output(rmsnorm, capsys):
    status, out, err = call(capsys, "run", str(rmsnorm["ours"]))
    assert status == 0 and "finite" in out, err


def test_validate_accepts_the_ort_target_output(rmsnorm, capsys):
    status, out, err = call(capsys, "validate", str(rmsnorm["ours"]), "--reference", str(rmsnorm["pt2"]))
    assert status == 0 and "PASSED" in out, out + err


def test_session_loads_the_ort_target_output(rmsnorm):
    x = np.random.default_rng(0).standard_normal((3, 11, st.D)).astype(np.float32)
    got = session(rmsnorm["ours"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, run_ort(str(rmsnorm["stock"]), {"x": x}), atol=1e-5, rtol=1e-5)


def _node(model: onnx.ModelProto, op_type: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.op_type == op_type)


def _extra_input(model: onnx.ModelProto) -> None:
    node = _node(model, ORT_ONLY)
    node.input.append(node.input[0])


def _unknown_attribute(model: onnx.ModelProto) -> None:
    _node(model, ORT_ONLY).attribute.append(onnx.helper.make_attribute("epsilonn", 1e-6))


def _epsilon_as_int(model: onnx.ModelProto) -> None:
    node = _node(model, ORT_ONLY)
    del node.attribute[:]
    node.attribute.append(onnx.helper.make_attribute("epsilon", 1))


def _flipped_op_type(model: onnx.ModelProto) -> None:
    _node(model, ORT_ONLY).op_type = "SimplifiedLayerNormalizatiom"


def _contrib_op_without_num_heads(model: onnx.ModelProto) -> None:
    node = _node(model, "MultiHeadAttention")
    kept = [a for a in node.attribute if a.name != "num_heads"]
    del node.attribute[:]
    node.attribute.extend(kept)


def _damaged_weight(model: onnx.ModelProto) -> None:
    model.graph.initializer[0].float_data.append(1.0)  # raw_data and float_data: two value fields


def _later_node_reads_nothing(model: onnx.ModelProto) -> None:
    model.graph.node[-1].input[0] = "no_such_value"


def _later_op_type_flipped(model: onnx.ModelProto) -> None:
    model.graph.node[-1].op_type = "Abb"


DAMAGES = [
    (_extra_input, f"({ORT_ONLY}) has 3 inputs; ONNX Runtime's schema takes 2 to 2"),
    (_unknown_attribute, "has attribute epsilonn, which ONNX Runtime's schema does not define"),
    (_epsilon_as_int, "has attribute epsilon of type INT; ONNX Runtime's schema wants FLOAT"),
    (_flipped_op_type, "No Op registered for SimplifiedLayerNormalizatiom"),
    (_contrib_op_without_num_heads, "(com.microsoft::MultiHeadAttention) lacks required attribute num_heads"),
    (_damaged_weight, "one and only one value field"),
    (_later_node_reads_nothing, "topologically sorted"),
    (_later_op_type_flipped, "No Op registered for Abb"),
]


@pytest.mark.parametrize("damage, match", DAMAGES, ids=[damage.__name__.strip("_") for damage, _ in DAMAGES])
def test_a_damaged_ort_target_output_is_refused(
    rmsnorm, tmp_path, capsys, damage: Callable[[onnx.ModelProto], None], match: str
):
    """Letting ORT's ops through lets nothing else through: a node that breaks ORT's schema, an
    op type neither knows, a damaged weight or node elsewhere in the same file are refused, by
    the loader and by ``run`` (one line, exit 2)."""
    model = onnx.load(rmsnorm["ours"])
    damage(model)
    path = tmp_path / "damaged.onnx"
    onnx.save(model, path)
    with pytest.raises(UsageError, match="is not a valid ONNX model"):
        load_onnx(path)
    status, _, err = call(capsys, "run", str(path))
    assert status == 2
    assert_one_line_error(err, match)


@pytest.mark.parametrize("entry", corpus.ENTRIES, ids=lambda e: e.name)
def test_every_target_of_every_corpus_model_loads(entry, tmp_path, capsys):
    """Each corpus model optimised for ort, trt and portable loads through runtime.session (with
    the ORT result of the stock export) and ``attn2onnx run``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stock = corpus.export(entry, corpus.build(entry))
    feeds = corpus.inputs(entry, 2, 7)
    for target in ("ort", "trt", "portable"):
        path = save_model(optimize_model(stock, target=target)[0], tmp_path / f"{target}.onnx")
        assert session(path).run(None, feeds)[0].shape == (2, 7, st.D), target
        status, _, err = call(capsys, "run", str(path))
        assert status == 0, f"{target}: {err}"
