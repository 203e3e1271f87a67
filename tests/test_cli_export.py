"""``attn2onnx export / run / validate / demo``: happy paths and every bad input of the issue
(one line on stderr, exit 2, no traceback, no partial output file)."""

from __future__ import annotations

import json
import pickle

import numpy as np
import onnx
import pytest
import torch

import attn2onnx
from attn2onnx.models import ModelConfig, build_model
from test_cli_basic import assert_one_line_error, call


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A small dcmha LM checkpoint and its export (made once for the module)."""
    folder = tmp_path_factory.mktemp("cli")
    ckpt = folder / "lm.pt"
    attn2onnx.save(build_model(ModelConfig(family="lm", variant="dcmha", d_model=32, heads=4, max_len=48)), ckpt)
    status = attn2onnx.cli.main(["export", str(ckpt), "-o", str(folder / "lm.onnx"), "--seq-len", "8"])
    assert status == 0
    return ckpt, folder / "lm.onnx"


def test_export_prints_parity_and_writes_custom_nodes(exported, capsys, tmp_path):
    ckpt, _ = exported
    status, out, err = call(
        capsys, "export", str(ckpt), "-o", str(tmp_path / "x.onnx"), "--batch", "1", "--seq-len", "6"
    )
    assert status == 0, err
    assert "max abs err" in out and "MISMATCH" not in out
    proto = onnx.load(str(tmp_path / "x.onnx"))
    assert any(n.domain == "ai.attn2onnx" for n in proto.graph.node)


def test_validate_json(exported, capsys):
    ckpt, model = exported
    status, out, err = call(
        capsys, "validate", str(model), "--reference", str(ckpt), "--shapes", "1x3,2x9,3x17", "--json"
    )
    assert status == 0, err
    result = json.loads(out)
    assert result["passed"] is True
    assert [c["shape"] for c in result["comparisons"]] == [[1, 3], [2, 9], [3, 17]]
    assert {c["backend"] for c in result["comparisons"]} == {"ort"}
    assert all(c["max_abs_err"] < 1e-4 and c["passed"] for c in result["comparisons"])


def test_validate_detects_mismatch(exported, capsys, tmp_path):
    """A reference whose weights differ from the exported ones: exit 1, passed false."""
    ckpt, model = exported
    other = tmp_path / "other.pt"
    attn2onnx.save(
        build_model(ModelConfig(family="lm", variant="dcmha", d_model=32, heads=4, max_len=48, seed=7)), other
    )
    status, out, _ = call(capsys, "validate", str(model), "--reference", str(other), "--json")
    assert status == 1
    assert json.loads(out)["passed"] is False


def test_run_with_inputs_and_outputs(exported, capsys, tmp_path):
    _, model = exported
    ids = np.random.default_rng(0).integers(0, 256, size=(2, 7))
    np.savez(tmp_path / "in.npz", input_ids=ids, key_padding_mask=np.ones((2, 7), bool))
    status, out, err = call(
        capsys, "run", str(model), "--inputs", str(tmp_path / "in.npz"), "-o", str(tmp_path / "out.npz")
    )
    assert status == 0, err
    with np.load(tmp_path / "out.npz") as data:
        assert data["logits"].shape == (2, 7, 256) and np.isfinite(data["logits"]).all()


@pytest.mark.parametrize(
    "inputs,match",
    [
        ({"input_ids": np.zeros((2, 7), np.int32), "key_padding_mask": np.ones((2, 7), bool)}, "must be int64"),
        ({"input_ids": np.zeros((2, 7, 1), np.int64), "key_padding_mask": np.ones((2, 7), bool)}, "must have 2 dims"),
        ({"input_ids": np.zeros((2, 7), np.int64), "key_padding_mask": np.ones((2, 6), bool)}, "seq is 6"),
        ({"input_ids": np.zeros((2, 7), np.int64)}, "missing input"),
        ({"input_ids": np.full((2, 7), 999, np.int64), "key_padding_mask": np.ones((2, 7), bool)}, "outside"),
    ],
)
def test_run_rejects_bad_inputs(exported, capsys, tmp_path, inputs, match):
    _, model = exported
    np.savez(tmp_path / "in.npz", **inputs)
    status, _, err = call(
        capsys, "run", str(model), "--inputs", str(tmp_path / "in.npz"), "-o", str(tmp_path / "out.npz")
    )
    assert status == 2
    assert_one_line_error(err, match)
    assert not (tmp_path / "out.npz").exists()


def _bad_files(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    torch.save({"w": torch.zeros(2)}, tmp_path / "state.pt")
    with open(tmp_path / "pickled.pt", "wb") as f:
        pickle.dump(torch.nn.Linear(2, 2), f)
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")


@pytest.mark.parametrize(
    "name,match",
    [
        ("missing.pt", "no such file"),
        ("junk.pt", "not an attn2onnx checkpoint"),
        ("state.pt", "not an attn2onnx checkpoint"),
        ("module.pt", "not unpickle"),
    ],
)
def test_export_rejects_bad_model_files(capsys, tmp_path, name, match):
    _bad_files(tmp_path)
    status, _, err = call(capsys, "export", str(tmp_path / name), "-o", str(tmp_path / "out.onnx"))
    assert status == 2
    assert_one_line_error(err, match)
    assert not (tmp_path / "out.onnx").exists()


def test_export_unknown_variant_in_checkpoint(capsys, tmp_path):
    model = build_model(ModelConfig(family="layer", variant="mha", d_model=16, heads=2))
    attn2onnx.save(model, tmp_path / "m.pt")
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    payload["config"]["variant"] = "nonexistent"
    torch.save(payload, tmp_path / "m.pt")
    status, _, err = call(capsys, "export", str(tmp_path / "m.pt"), "-o", str(tmp_path / "out.onnx"))
    assert status == 2
    assert_one_line_error(err, "unknown variant")
    assert not (tmp_path / "out.onnx").exists()


def test_export_super_beyond_max_len(capsys, tmp_path):
    attn2onnx.save(
        build_model(ModelConfig(family="layer", variant="super", d_model=16, heads=2, max_len=8)), tmp_path / "s.pt"
    )
    status, _, err = call(capsys, "export", str(tmp_path / "s.pt"), "-o", str(tmp_path / "out.onnx"), "--seq-len", "9")
    assert status == 2
    assert_one_line_error(err, "exceeds")
    assert not (tmp_path / "out.onnx").exists()


def test_causal_for_non_causal_variant(capsys, tmp_path):
    status, _, err = call(capsys, "new", "imhsa", "-o", str(tmp_path / "m.pt"), "--family", "lm")
    assert status == 2
    assert_one_line_error(err, "cannot be causal")
    assert not (tmp_path / "m.pt").exists()


def test_trusted_pickle_exports(capsys, tmp_path):
    """A pickled attn2onnx model exports only with --trust-pickle."""
    torch.save(
        build_model(ModelConfig(family="layer", variant="mha", d_model=16, heads=2, max_len=32)), tmp_path / "p.pt"
    )
    status, _, err = call(capsys, "export", str(tmp_path / "p.pt"), "-o", str(tmp_path / "p.onnx"))
    assert status == 2 and "pickled" in err
    status, _, err = call(capsys, "export", str(tmp_path / "p.pt"), "-o", str(tmp_path / "p.onnx"), "--trust-pickle")
    assert status == 0, err


@pytest.mark.parametrize(
    "args,match",
    [
        (["validate", "MODEL", "--reference", "CKPT", "--shapes", "2by3"], "bad shape"),
        (["validate", "MODEL", "--reference", "CKPT", "--shapes", "1x500"], "exceeds"),
        (["validate", "MODEL", "--reference", "CKPT", "--backends", "tpu"], "unknown backend"),
        (["validate", "CKPT", "--reference", "CKPT"], "is a PyTorch file, not an ONNX model: export it first"),
        (["run", "CKPT"], "is a PyTorch file, not an ONNX model: export it first"),
    ],
)
def test_validate_and_run_bad_input(exported, capsys, args, match):
    ckpt, model = exported
    args = [str(model) if a == "MODEL" else str(ckpt) if a == "CKPT" else a for a in args]
    status, _, err = call(capsys, *args)
    assert status == 2
    assert_one_line_error(err, match)


def test_demo_subset_json(capsys, tmp_path):
    status, out, err = call(capsys, "demo", "--out", str(tmp_path), "--variants", "super,reuse", "--json")
    assert status == 0, err
    rows = json.loads(out)
    assert [r["variant"] for r in rows] == ["super", "reuse"]
    assert all(r["passed"] and r["custom_nodes"] >= 1 for r in rows)


def test_demo_unknown_variant(capsys, tmp_path):
    status, _, err = call(capsys, "demo", "--out", str(tmp_path), "--variants", "nope")
    assert status == 2
    assert_one_line_error(err, "unknown variant")


@pytest.mark.skipif(__import__("importlib").util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
@pytest.mark.parametrize(
    "args",
    [
        ["build-engine", "MODEL", "-o", "ENGINE", "--shapes", "1x1/2x8/4x32"],
        ["run", "MODEL", "--backend", "trt"],
        ["validate", "MODEL", "--reference", "CKPT", "--backends", "ort,trt"],
    ],
)
def test_tensorrt_commands_without_tensorrt(exported, capsys, tmp_path, args):
    """Where TensorRT is missing: one line saying so, exit 2, no engine file."""
    ckpt, model = exported
    args = [{"MODEL": str(model), "CKPT": str(ckpt), "ENGINE": str(tmp_path / "m.engine")}.get(a, a) for a in args]
    status, _, err = call(capsys, *args)
    assert status == 2
    assert_one_line_error(err, "TensorRT is not installed")
    assert not (tmp_path / "m.engine").exists()


def test_build_engine_bad_shapes(exported, capsys, tmp_path):
    _, model = exported
    status, _, err = call(
        capsys, "build-engine", str(model), "-o", str(tmp_path / "m.engine"), "--shapes", "4x8/2x8/1x8"
    )
    assert status == 2
    assert_one_line_error(err, "min <= opt <= max")


def test_doctor_json(capsys):
    status, out, _ = call(capsys, "doctor", "--json")
    assert status == 0
    report = json.loads(out)
    assert set(report) == {"onnxruntime", "native_kernels", "cuda", "triton", "tensorrt"}
    assert report["onnxruntime"]["available"] is True
    assert report["cuda"]["available"] == torch.cuda.is_available()


def test_validate_dtype_must_match_the_model(exported, capsys):
    ckpt, model = exported
    status, _, err = call(capsys, "validate", str(model), "--reference", str(ckpt), "--dtype", "fp16")
    assert status == 2
    assert_one_line_error(err, "computes in fp32")


@pytest.mark.parametrize("family,variant", [("lm", "dcmha"), ("layer", "super")])
def test_fp16_export_validates_with_fp16_tolerances(capsys, tmp_path, family, variant):
    """--dtype fp16: a half-precision graph (fp16 weights, fp16 float inputs) that matches the
    fp32 PyTorch model within fp16 tolerances; the fp32 tolerance is refused for it."""
    ckpt = tmp_path / "m.pt"
    attn2onnx.save(build_model(ModelConfig(family=family, variant=variant, d_model=32, heads=4, max_len=48)), ckpt)
    status, out, err = call(
        capsys, "export", str(ckpt), "-o", str(tmp_path / "m16.onnx"), "--dtype", "fp16", "--seq-len", "8"
    )
    assert status == 0, err
    proto = onnx.load(str(tmp_path / "m16.onnx"))
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in proto.graph.initializer)
    status, out, err = call(
        capsys, "validate", str(tmp_path / "m16.onnx"), "--reference", str(ckpt), "--dtype", "fp16", "--json"
    )
    assert status == 0, err
    result = json.loads(out)
    assert result["passed"] and all(0 < c["max_abs_err"] < 1e-2 for c in result["comparisons"])


def test_export_torch_export_program(capsys, tmp_path):
    """A torch.export .pt2 program exports (dynamic dims kept, our ops kept) and passes the check."""
    model = build_model(ModelConfig(family="layer", variant="dcmha", d_model=32, heads=4, max_len=64))
    x, mask = torch.randn(2, 8, 32), torch.ones(2, 8, dtype=torch.bool)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=64)
    program = torch.export.export(model, (x, mask), dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}))
    torch.export.save(program, tmp_path / "layer.pt2")
    status, out, err = call(capsys, "export", str(tmp_path / "layer.pt2"), "-o", str(tmp_path / "layer.onnx"))
    assert status == 0, err
    assert "MISMATCH" not in out
    proto = onnx.load(str(tmp_path / "layer.onnx"))
    assert [d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim][:2] == ["batch", "seq"]
    assert any(n.op_type == "DcmhaAttention" for n in proto.graph.node)
