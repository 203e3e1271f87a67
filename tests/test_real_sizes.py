"""Billion-parameter release folders within one machine (issue 24), at CI size.

The streaming export (:mod:`attn2onnx.streaming`) traces the model on ``meta`` and reads each
weight from the safetensors shards while it writes the external data. Here a small release
folder (written by the same code as scripts/make_release_checkpoint.py, sharded) goes through
it and must give the in-memory export's outputs; the decode graph passes validate's decode
check; the size limits refuse a 6.9B folder (headers only, a sparse file) in one line before
any work; and the export's peak memory above a same-graph folder of tiny width stays a fraction
of the weights it writes (the in-memory path holds several copies). benchmarks/real_sizes.py
runs the same at 2.8B.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from attn2onnx.errors import UsageError
from attn2onnx.exporter import export
from attn2onnx.importers.dcformer import import_dcformer
from attn2onnx.io_spec import random_inputs
from attn2onnx.runtime import session
from attn2onnx.sources import from_module
from attn2onnx.streaming.command import export_release
from attn2onnx.streaming.export import export_streamed
from attn2onnx.streaming.limits import available_memory, check_fits, estimate
from attn2onnx.streaming.release import ReleaseCheckpoint
from attn2onnx.streaming.synthetic import (
    PRESETS,
    parameter_count,
    release_shapes,
    scaled,
    write_release_checkpoint,
)
from peak_rss import available

TINY = dict(
    block_size=64,
    vocab_size=256,
    n_layer=2,
    n_head=4,
    dim=64,
    intermediate_size=256,
    rope_base=10000.0,
    use_qk_norm=True,
    window_size=8,
    window_type="LGLL",
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small release folder in three safetensors shards (bf16, as released)."""
    folder = tmp_path_factory.mktemp("release")
    shards = list(write_release_checkpoint(folder, TINY, shard_bytes=100_000))
    assert len(shards) >= 3 and (folder / "model.safetensors.index.json").is_file()
    return folder


def test_lazy_checkpoint_gives_the_import(tiny):
    """Every tensor read by name, per layer, from the shards is the in-memory import's."""
    checkpoint = ReleaseCheckpoint(tiny)
    state = import_dcformer(tiny).state_dict()
    assert set(state) == set(checkpoint.shapes)
    for name, tensor in state.items():
        assert torch.equal(checkpoint.tensor(name), tensor), name
    assert checkpoint.weight_bytes == parameter_count(TINY) * 2


def test_sparse_folder_is_a_checkpoint_of_zeros(tmp_path):
    """``values=False`` (the 6.9B folder of the benchmarks: no disk used) is a valid release
    checkpoint: every key in the index's weight map, the static head mixes the identity the
    release stores (zeros made the importer refuse it: a mix without use_sw), the rest zeros."""
    import json

    folder = tmp_path / "zeros"
    list(write_release_checkpoint(folder, TINY, shard_bytes=100_000, values=False))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(release_shapes(TINY))
    state = import_dcformer(folder).state_dict()
    assert state and all(not t.any() for k, t in state.items() if k.endswith("weight"))


def test_published_sizes():
    """The presets count what the papers release; the CI-sized version of 2.8B is ~100M."""
    assert round(parameter_count(PRESETS["2.8b"]) / 1e9, 1) == 2.8
    assert round(parameter_count(PRESETS["6.9b"]) / 1e9, 1) == 7.0
    assert 80e6 < parameter_count(scaled(PRESETS["2.8b"], 0.2, 12)) < 120e6


def test_streamed_export_is_the_in_memory_export(tiny, tmp_path):
    """fp32, weights in external data: the same outputs as the in-memory export, bit for bit."""
    streamed = export_streamed(tiny, tmp_path / "s.onnx", dtype="fp32").path
    model = import_dcformer(tiny)
    source = from_module(model)
    inputs = random_inputs(source.specs, 2, 16, pad=False)
    example = [torch.from_numpy(a) for a in inputs.values()]
    in_memory = export(model, example, tmp_path / "m.onnx", specs=source.specs, max_seq=source.max_seq).path
    proto = onnx.load(str(streamed), load_external_data=False)
    large = [t for t in proto.graph.initializer if np.prod(t.dims) > 64]
    assert large and all(t.data_location == onnx.TensorProto.EXTERNAL for t in large)
    a = session(streamed).run(None, inputs)[0]
    b = session(in_memory).run(None, inputs)[0]
    np.testing.assert_array_equal(a, b)


def test_streamed_decode_export_passes_the_decode_check(tiny, tmp_path):
    """--decode streamed: prefill + decode steps in ORT agree with PyTorch's full forward."""
    from attn2onnx.validate import check_parity

    path = export_streamed(tiny, tmp_path / "d.onnx", dtype="fp32", decode=True).path
    report = check_parity(path, import_dcformer(tiny), decode=True, steps=2)
    assert report.passed, report.comparisons


def _export_args(model, output, **given) -> argparse.Namespace:
    args = dict(
        model=str(model), output=str(output), dtype="fp32", decode=False, opset=23, batch=None, seq_len=None,
        static=False, optimize=False, target="ort", no_check=False, atol=None, rtol=None,
        check_error_stat="elemwise", save_inputs=None,
    )  # fmt: skip
    return argparse.Namespace(**{**args, **given})


def test_size_limits_refuse_in_one_line_before_any_work(tmp_path):
    """6.9B in fp32 (27.9 GB of weights): the check after export cannot fit beside them on
    this machine, said before anything is traced or written; a small disk or memory likewise."""
    folder = tmp_path / "dcformer-6.9b"
    list(write_release_checkpoint(folder, PRESETS["6.9b"], values=False))  # headers only: sparse
    out = tmp_path / "big.onnx"
    est = estimate(ReleaseCheckpoint(folder), "fp32")
    with pytest.raises(UsageError, match=r"check after export needs ~\d+\.\d GiB.*add --no-check") as err:
        check_fits(est, out, check=True, memory=24 * 2**30)
    assert "\n" not in str(err.value)
    check_fits(est, out, check=False, memory=24 * 2**30)  # the export alone fits in 24 GiB
    with pytest.raises(UsageError, match=r"writes 26\.\d GiB .* has 10\.0 GiB free"):
        check_fits(est, out, check=False, memory=24 * 2**30, disk=10 * 2**30)
    with pytest.raises(UsageError, match="no export of this model fits here"):
        check_fits(est, out, check=False, memory=4 * 2**30)
    if est.check_memory > available_memory():  # through the command: any machine under 80 GiB
        with pytest.raises(UsageError, match="add --no-check"):
            export_release(_export_args(folder, out))
        assert not list(tmp_path.glob("big.onnx*"))


_CHILD = """\
import sys
from attn2onnx.streaming.export import export_streamed
export_streamed(sys.argv[1], sys.argv[2], dtype="fp32")
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(int(hwm.split()[1]) * 1024)
"""


def _peak(folder, out) -> int:
    done = subprocess.run([sys.executable, "-c", _CHILD, str(folder), str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not available(), reason="no /proc/self/status to read a process's peak resident size from")
def test_streamed_export_peak_memory_is_a_fraction_of_the_weights(tmp_path):
    """A 139 MB (fp32) folder against one of the same graph at width 64: the streaming export's
    peak grows by less than half the weights it writes (one layer at a time is ~28 MB in float32; the
    in-memory path holds the float32 model and the exporter's copies, several times them)."""
    wide = dict(TINY, vocab_size=4096, n_layer=4, dim=768, intermediate_size=2048, block_size=512, window_size=64)
    narrow = dict(wide, dim=64, intermediate_size=256)
    peaks, weights = [], []
    for name, config in (("narrow", narrow), ("wide", wide)):
        list(write_release_checkpoint(tmp_path / name, config))
        peaks.append(_peak(tmp_path / name, tmp_path / f"{name}.onnx"))
        weights.append((tmp_path / f"{name}.onnx.data").stat().st_size)
    assert weights[1] > 130e6
    assert peaks[1] - peaks[0] < 0.5 * weights[1], (peaks, weights)


def test_export_command_streams_large_release_folders_only(tiny, tmp_path, monkeypatch):
    """``attn2onnx export FOLDER`` takes the streaming path from STREAM_FROM fp32 bytes (lowered
    here to the tiny folder's size): the weights land in external data; a transformers folder
    or one below the size keeps the in-memory path."""
    import json

    from attn2onnx import cli
    from attn2onnx.streaming import command

    size = parameter_count(TINY) * 4
    folder_args = argparse.Namespace(model=str(tiny))
    monkeypatch.setattr(command, "STREAM_FROM", size + 1)
    assert not command.streams(folder_args)
    monkeypatch.setattr(command, "STREAM_FROM", size)
    assert command.streams(folder_args)
    out = tmp_path / "m.onnx"
    assert cli.main(["export", str(tiny), "-o", str(out), "--no-check"]) == 0
    assert (tmp_path / "m.onnx.data").stat().st_size > 0.9 * size  # the fp32 weights (small ones inline)
    other = tmp_path / "hf"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    for shard in tiny.glob("*.safetensors"):
        (other / shard.name).write_bytes(shard.read_bytes())
    assert not command.streams(argparse.Namespace(model=str(other)))


def test_validate_picks_a_bf16_reference_where_float32_does_not_fit(tiny, tmp_path, monkeypatch):
    """validate against a large release folder (STREAM_FROM lowered to the tiny folder's size):
    the reference is float32 where it fits beside the graph's session, the release's bf16 where
    only that fits (said in the report; an int4 graph passes its tolerance against it), and a
    one-line error where neither does, before anything loads."""
    from attn2onnx.quantize import quant_mode, quantize_file
    from attn2onnx.streaming import command, limits
    from attn2onnx.streaming.reference import HEADROOM, reference_bytes
    from attn2onnx.validate import check_parity

    monkeypatch.setattr(command, "STREAM_FROM", parameter_count(TINY) * 4)
    decode = export_streamed(tiny, tmp_path / "d.onnx", dtype="fp32", decode=True).path
    graph = quantize_file(decode, tmp_path / "q.onnx", quant_mode("int4")).bytes_after
    report = check_parity(tmp_path / "q.onnx", str(tiny), decode=True, steps=2)
    assert report.passed and report.reference == "fp32"
    bf16 = math.ceil(reference_bytes(ReleaseCheckpoint(tiny).parameters(), graph, "bf16") / HEADROOM)
    monkeypatch.setattr(limits, "available_memory", lambda: bf16)
    report = check_parity(tmp_path / "q.onnx", str(tiny), decode=True, steps=2)
    assert report.passed and report.reference == "bf16", report.comparisons
    assert report.to_dict()["reference"] == "bf16"
    monkeypatch.setattr(limits, "available_memory", lambda: bf16 - 1)
    with pytest.raises(UsageError, match="even with a bf16 reference") as err:
        check_parity(tmp_path / "q.onnx", str(tiny), decode=True, steps=2)
    assert "\n" not in str(err.value)
