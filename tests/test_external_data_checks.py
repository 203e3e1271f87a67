"""External-data references that name the wrong number of bytes, or bytes another tensor owns
(issue 19, item 8). ``optimize`` took a ``length`` shorter than the dims need and wrote a corrupt
model with exit 0; without ``length`` a file too short was a traceback; 400 tensors on one
1 MiB range became a 400 MiB output. Each is now one ``attn2onnx: error:`` line, exit 2,
nothing written."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from attn2onnx.external_data import ExternalDataError, check_external_data
from test_cli_basic import assert_one_line_error, call

D = 8  # each weight is [D, D] float32: 256 bytes


def external_model(folder, entries: list[dict[str, str | None]], data_bytes: int, dtype: int = TensorProto.FLOAT):
    """``y = x @ w0 @ w1 ...`` with each ``w{i}`` [D, D] stored externally as ``entries[i]`` says
    (location / offset / length; None leaves a key out) over a data file of ``data_bytes``."""
    (folder / "w.bin").write_bytes(np.random.default_rng(0).bytes(data_bytes))
    inits, nodes, current = [], [], "x"
    for i, entry in enumerate(entries):
        tensor = TensorProto(name=f"w{i}", data_type=dtype, dims=[D, D], data_location=TensorProto.EXTERNAL)
        for key, value in {"location": "w.bin", **entry}.items():
            if value is not None:
                item = tensor.external_data.add()
                item.key, item.value = key, value
        inits.append(tensor)
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"h{i}"]))
        current = f"h{i}"
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", D])
    y = helper.make_tensor_value_info(current, TensorProto.FLOAT, ["batch", D])
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 21)]
    )
    path = folder / "m.onnx"
    onnx.save(model, path)
    return path


def refused_by_optimize(capsys, path, match: str) -> None:
    before = sorted(os.listdir(path.parent))
    status, out, err = call(capsys, "optimize", str(path), "-o", str(path.parent / "out.onnx"))
    assert status == 2, (status, out, err)
    assert_one_line_error(err, match)
    assert sorted(os.listdir(path.parent)) == before


def test_short_length_is_refused_by_optimize(capsys, tmp_path):
    """A length of half the tensor's bytes: it used to be optimised into a corrupt model, exit 0."""
    path = external_model(tmp_path, [{"offset": "0", "length": "128"}], 256)
    refused_by_optimize(capsys, path, "tensor 'w0': external data length 128 is not the 256 bytes")


def test_long_length_is_refused(tmp_path):
    path = external_model(tmp_path, [{"offset": "0", "length": "300"}], 512)
    with pytest.raises(ExternalDataError, match="length 300 is not the 256 bytes its dims"):
        check_external_data(onnx.load(path, load_external_data=False), path)


def test_no_length_and_a_file_too_short_is_refused_by_optimize(capsys, tmp_path):
    """Without a length the dims say how much is read: a file shorter was a traceback."""
    path = external_model(tmp_path, [{"offset": "64"}], 256)
    refused_by_optimize(capsys, path, "tensor 'w0': external data bytes 64..320 lie past the end of 'w.bin'")


def test_string_and_unknown_dtypes_are_refused(tmp_path):
    for dtype, match in ((TensorProto.STRING, "a STRING tensor cannot be stored"), (99, "unknown dtype 99")):
        path = external_model(tmp_path, [{"offset": "0"}], 256, dtype=dtype)
        with pytest.raises(ExternalDataError, match=match):
            check_external_data(onnx.load(path, load_external_data=False), path)


def test_sub_byte_dtypes_are_counted_packed(tmp_path):
    """INT4 [8, 8] is 32 bytes on disk: that length is accepted, the float32 length refused."""
    path = external_model(tmp_path, [{"offset": "0", "length": "32"}], 32, dtype=TensorProto.INT4)
    check_external_data(onnx.load(path, load_external_data=False), path)
    path = external_model(tmp_path, [{"offset": "0", "length": "256"}], 256, dtype=TensorProto.INT4)
    with pytest.raises(ExternalDataError, match="length 256 is not the 32 bytes"):
        check_external_data(onnx.load(path, load_external_data=False), path)


def test_aliased_ranges_are_refused_by_optimize(capsys, tmp_path):
    """400 tensors naming one range: optimize wrote 400 copies (a 1 MiB file became 400 MiB)."""
    path = external_model(tmp_path, [{"offset": "0", "length": "256"}] * 400, 256)
    refused_by_optimize(capsys, path, "tensors 'w0' and 'w1' share external data bytes of 'w.bin'")


def test_partly_overlapping_ranges_are_refused(tmp_path):
    path = external_model(tmp_path, [{"offset": "0"}, {"offset": "512"}, {"offset": "128"}], 1024)
    match = r"tensors 'w0' and 'w2' share external data bytes of 'w.bin' \(from 128\)"
    with pytest.raises(ExternalDataError, match=match):
        check_external_data(onnx.load(path, load_external_data=False), path)


def test_adjacent_ranges_are_accepted(tmp_path):
    """What onnx.save writes: each tensor right after the previous one (and gaps are fine)."""
    path = external_model(tmp_path, [{"offset": "0"}, {"offset": "256", "length": "256"}, {"offset": "1024"}], 1280)
    check_external_data(onnx.load(path, load_external_data=False), path)
