"""Odd values on the command line (issue 11, item 7): zero, negative, huge, a reference of
another model, an unsupported opset, files ONNX Runtime or torch refuse. Each must give exit 2
and exactly one line ``attn2onnx: error: ...`` on stderr, no traceback, and write nothing."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import attn2onnx
from attn2onnx.commands import variants
from attn2onnx.io_spec import METADATA_KEY, InputSpec, specs_to_json
from attn2onnx.models import ModelConfig, build_model
from attn2onnx.runtime.sessions import SessionLoadError, session
from test_cli_basic import assert_one_line_error, call


def refused(capsys, folder, *args: str, match: str) -> None:
    """``attn2onnx ARGS`` exits 2 with one error line containing ``match`` and adds no file to ``folder``."""
    before = sorted(os.listdir(folder))
    status, out, err = call(capsys, *args)
    assert status == 2, (status, out, err)
    assert_one_line_error(err, match)
    assert sorted(os.listdir(folder)) == before


def save_lm(path, **sizes) -> str:
    """A small randomly initialised causal LM checkpoint."""
    config = dict(family="lm", variant="dcmha", d_model=16, heads=2, max_len=16) | sizes
    attn2onnx.save(build_model(ModelConfig(**config)), path)
    return str(path)


def save_onnx(path, op: str, dims: list, domain: str = "") -> str:
    """A one-node ONNX model ``y = op(x)`` (op of ``domain``) on a float input of ``dims``, with
    attn2onnx's input metadata."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)
    opsets = [helper.make_opsetid("", 23)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(
        helper.make_graph([helper.make_node(op, ["x"], ["y"], domain=domain)], "g", [x], [y]), opset_imports=opsets
    )
    helper.set_model_props(model, {METADATA_KEY: specs_to_json([InputSpec("x", tuple(dims), "float")])})
    onnx.save(model, path)
    return str(path)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A small dcmha LM (max_len 16) and its export, made once for the module."""
    folder = tmp_path_factory.mktemp("errors")
    ckpt = save_lm(folder / "lm.pt")
    assert attn2onnx.cli.main(["export", ckpt, "-o", str(folder / "lm.onnx"), "--seq-len", "8", "--no-check"]) == 0
    return ckpt, str(folder / "lm.onnx")


# --- sizes and counts: positive integers at argparse level, for every command ---------------
@pytest.mark.parametrize(
    "args,match",
    [
        (["run", "m.onnx", "--seq-len", "0"], "argument --seq-len: must be a positive integer, got 0"),
        (["run", "m.onnx", "--seq-len", "-3"], "argument --seq-len: must be a positive integer, got -3"),
        (["run", "m.onnx", "--batch", "0"], "argument --batch: must be a positive integer, got 0"),
        (["run", "m.onnx", "--threads", "0"], "argument --threads: must be a positive integer, got 0"),
        (["run", "m.onnx", "--threads", "1.5"], "argument --threads: invalid int value: '1.5'"),
        (["export", "m.pt", "-o", "m.onnx", "--batch", "0"], "argument --batch: must be a positive integer"),
        (["export", "m.pt", "-o", "m.onnx", "--seq-len", "-1"], "argument --seq-len: must be a positive integer"),
        (
            ["validate", "m.onnx", "--reference", "m.pt", "--seed", "-1"],
            "argument --seed: must be a non-negative integer",
        ),
        (["new", "mha", "-o", "m.pt", "--max-len", "0"], "argument --max-len: must be a positive integer, got 0"),
        (["new", "mha", "-o", "m.pt", "--heads", "0"], "argument --heads: must be a positive integer, got 0"),
        (["new", "mha", "-o", "m.pt", "--d-model", "-8"], "argument --d-model: must be a positive integer, got -8"),
        (["new", "mha", "-o", "m.pt", "--vocab-size", "0"], "argument --vocab-size: must be a positive integer"),
        (
            ["build-engine", "m.onnx", "-o", "m.engine", "--workspace-gb", "0"],
            "argument --workspace-gb: must be a positive",
        ),
        (
            ["build-engine", "m.onnx", "-o", "m.engine", "--workspace-gb", "nan"],
            "argument --workspace-gb: must be a finite",
        ),
    ],
)
def test_sizes_must_be_positive(capsys, tmp_path, monkeypatch, args, match):
    monkeypatch.chdir(tmp_path)
    refused(capsys, tmp_path, *args, match=match)


def test_new_token_encoder_needs_room_past_its_cls_token(capsys, tmp_path):
    refused(
        capsys,
        tmp_path,
        "new",
        "mha",
        "-o",
        str(tmp_path / "m.pt"),
        "--family",
        "encoder",
        "--max-len",
        "1",
        match="max_len 1 leaves no room for a token",
    )


# --- sequence past the model's max_len, huge inputs, MemoryError ----------------------------
def test_run_sequence_past_max_len(exported, capsys, tmp_path):
    _, model = exported
    refused(
        capsys,
        tmp_path,
        "run",
        model,
        "--seq-len",
        "17",
        "-o",
        str(tmp_path / "out.npz"),
        match="sequence length 17 exceeds the model's maximum sequence length 16",
    )


def test_export_records_max_seq(exported):
    props = {p.key: p.value for p in onnx.load(exported[1]).metadata_props}
    assert props["attn2onnx.max_seq"] == "16"


def test_run_refuses_inputs_larger_than_memory(capsys, tmp_path):
    model = save_onnx(tmp_path / "id.onnx", "Identity", ["batch", "seq"])
    refused(
        capsys,
        tmp_path,
        "run",
        model,
        "--batch",
        "100000000",
        "--seq-len",
        "100000000",
        match="inputs of batch 100000000 x seq 100000000 take",
    )


def test_validate_refuses_shapes_larger_than_memory(exported, capsys, tmp_path):
    ckpt, model = exported
    refused(
        capsys,
        tmp_path,
        "validate",
        model,
        "--reference",
        ckpt,
        "--shapes",
        "1000000000000x4",
        match="more than this machine's",
    )


def test_memory_error_is_one_line(capsys, tmp_path, monkeypatch):
    def out_of_memory(args):
        raise MemoryError()

    monkeypatch.setattr(variants, "run", out_of_memory)
    refused(capsys, tmp_path, "variants", match="out of memory")


# --- validate against a reference of another model ------------------------------------------
@pytest.mark.parametrize(
    "sizes,match",
    [
        (dict(vocab_size=512), "output 'logits' of"),  # was a broadcast ValueError
        (dict(family="encoder", variant="mha"), "output 'logits' of"),  # was a broadcast ValueError
        (
            dict(vocab_size=100, variant="mha"),
            "takes ids in [0, 256) but the reference only in [0, 100)",
        ),  # was an IndexError
    ],
)
def test_validate_reference_of_another_model(exported, capsys, tmp_path, sizes, match):
    _, model = exported
    other = save_lm(tmp_path / "other.pt", **sizes)
    refused(capsys, tmp_path, "validate", model, "--reference", other, "--shapes", "1x5", match=match)


def test_validate_needs_a_backend(exported, capsys, tmp_path):
    ckpt, model = exported
    refused(
        capsys,
        tmp_path,
        "validate",
        model,
        "--reference",
        ckpt,
        "--shapes",
        "1x5",
        "--backends",
        ",",
        match="names no backend",
    )


# --- opsets --------------------------------------------------------------------------------
def test_export_opset_out_of_range(exported, capsys, tmp_path):
    ckpt, _ = exported
    refused(
        capsys,
        tmp_path,
        "export",
        ckpt,
        "-o",
        str(tmp_path / "x.onnx"),
        "--opset",
        "5",
        match="--opset 5 is not supported: torch's exporter and the ai.attn2onnx op bodies support opsets 18 to 23",
    )


def test_export_opset_other_than_the_op_bodies(exported, capsys, tmp_path):
    ckpt, _ = exported
    refused(
        capsys,
        tmp_path,
        "export",
        ckpt,
        "-o",
        str(tmp_path / "x.onnx"),
        "--opset",
        "22",
        match="models with ai.attn2onnx ops need --opset 23",
    )


# --- files ONNX Runtime or torch refuse -----------------------------------------------------
def test_run_model_onnx_runtime_cannot_load(capsys, tmp_path):
    """A valid ONNX model (onnx.checker does not know the domain) that ORT has no kernel for."""
    model = save_onnx(tmp_path / "bad.onnx", "NoSuchOp", ["batch", 4], domain="com.example")
    refused(capsys, tmp_path, "run", model, match=f"{model}: ONNX Runtime cannot load it: ")


def test_run_external_data_of_the_wrong_length(capsys, tmp_path):
    """External data inside the model's folder but of the wrong length: refused before ORT reads it."""
    weight = onnx.numpy_helper.from_array(np.ones(64, np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])
    model = helper.make_model(
        helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g", [x], [y], [weight]),
        opset_imports=[helper.make_opsetid("", 23)],
    )
    onnx.external_data_helper.convert_model_to_external_data(model, location="m.data", size_threshold=0)
    onnx.save(model, tmp_path / "m.onnx")
    model = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    length = next(e for e in model.graph.initializer[0].external_data if e.key == "length")
    length.value = "128"  # the file holds 256 bytes: a range that exists, but not the tensor's size
    onnx.save(model, tmp_path / "m.onnx")
    refused(capsys, tmp_path, "run", str(tmp_path / "m.onnx"), match="external data length 128 is not the 256 bytes")


def test_session_load_errors_name_the_model(tmp_path):
    model = onnx.load(save_onnx(tmp_path / "bad.onnx", "NoSuchOp", ["batch", 4]))
    with pytest.raises(SessionLoadError, match="the in-memory model: ONNX Runtime cannot load it: .*NoSuchOp"):
        session(model.SerializeToString(), native=False)


def test_bad_pt2_is_one_line_without_torch_log(capfd, tmp_path):
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(open(save_lm(tmp_path / "lm.pt"), "rb").read())  # a zip, but not a torch.export program
    os.remove(tmp_path / "lm.pt")
    status, out, err = call(capfd, "export", str(bad), "-o", str(tmp_path / "x.onnx"), "--trust-pickle")
    assert status == 2
    assert_one_line_error(err, "bad.pt2: not a readable torch.export program (PytorchStreamReader failed")
    assert sorted(os.listdir(tmp_path)) == ["bad.pt2"]
