"""One loading policy for every torch file (attn2onnx.torch_files): a .pt2 program never
unpickles or runs native code without --trust-pickle, a small file cannot make attn2onnx inflate
or allocate gigabytes (zip checks before torch.load, config sizes before any allocation), and
trusted pickles keep working."""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path
from typing import Callable

import onnx
import pytest
import torch
from onnx import TensorProto, helper

import attn2onnx
from attn2onnx import CheckpointError, ModelConfig, UsageError, build_model
from attn2onnx.checkpoint import FORMAT, VERSION
from attn2onnx.models.build import state_size
from attn2onnx.models.config import MAX_LAYERS
from attn2onnx.sources import load_source
from attn2onnx.torch_files import TorchFileError, load_program
from test_cli_basic import assert_one_line_error, call

LAYER = dict(family="layer", variant="mha", d_model=16, heads=2, max_len=16)


class _Exploit:
    """Unpickling this creates ``target``: the marker that code from the file ran."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _rewrite(src: Path, dst: Path, edit: Callable[[dict[str, bytes]], None]) -> Path:
    """Copy the torch zip archive ``src`` to ``dst`` (entries stored, as torch writes them)
    after ``edit`` changed its entries, named below the archive's root folder."""
    with zipfile.ZipFile(src) as archive:
        root = archive.namelist()[0].split("/", 1)[0]
        entries = {name.split("/", 1)[1]: archive.read(name) for name in archive.namelist()}
    edit(entries)
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as archive:
        for name, data in entries.items():
            archive.writestr(f"{root}/{name}", data)
    return dst


@pytest.fixture(scope="module")
def program(tmp_path_factory) -> Path:
    """A legitimate torch.export program of a small attention layer."""
    path = tmp_path_factory.mktemp("pt2") / "layer.pt2"
    model = build_model(ModelConfig(**LAYER))
    x, mask = torch.randn(2, 8, 16), torch.ones(2, 8, dtype=torch.bool)
    torch.export.save(torch.export.export(model, (x, mask)), path)
    return path


# --- .pt2 programs -----------------------------------------------------------------------------
def _pickled_weight(entries: dict[str, bytes], marker: Path) -> None:
    config = json.loads(entries["data/weights/model_weights_config.json"])
    meta = next(iter(config["config"].values()))
    meta["use_pickle"] = True
    entries["data/weights/model_weights_config.json"] = json.dumps(config).encode()
    entries[f"data/weights/{meta['path_name']}"] = _torch_bytes(_Exploit(marker))


def _opaque_constant(entries: dict[str, bytes], marker: Path) -> None:
    config = json.loads(entries["data/constants/model_constants_config.json"])
    config["config"]["evil"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}
    entries["data/constants/model_constants_config.json"] = json.dumps(config).encode()
    entries["data/constants/opaque_obj_0"] = pickle.dumps(_Exploit(marker))


def _sample_inputs(entries: dict[str, bytes], marker: Path) -> None:
    entries["data/sample_inputs/model.pt"] = _torch_bytes(((_Exploit(marker),), {}))


HOSTILE = {
    "pickled-weight": (_pickled_weight, "data/weights/weight_0"),
    "opaque-constant": (_opaque_constant, "data/constants/opaque_obj_0"),
    "sample-inputs": (_sample_inputs, "data/sample_inputs/model.pt"),
}


def _hostile(program: Path, tmp_path: Path, kind: str) -> tuple[Path, Path, str]:
    make, entry = HOSTILE[kind]
    marker = tmp_path / "pwned"
    evil = _rewrite(program, tmp_path / "evil.pt2", lambda entries: make(entries, marker))
    return evil, marker, entry


@pytest.mark.parametrize("kind", HOSTILE)
def test_hostile_program_is_refused_without_running_it(program, capsys, tmp_path, kind):
    evil, marker, entry = _hostile(program, tmp_path, kind)
    status, _, err = call(capsys, "export", str(evil), "-o", str(tmp_path / "x.onnx"))
    assert not marker.exists(), "the file's payload ran"
    assert status == 2
    assert_one_line_error(err, entry)
    assert "--trust-pickle" in err and not (tmp_path / "x.onnx").exists()


def test_hostile_program_is_refused_as_a_validate_reference(program, capsys, tmp_path):
    evil, marker, entry = _hostile(program, tmp_path, "sample-inputs")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 16])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph), tmp_path / "m.onnx")
    status, _, err = call(capsys, "validate", str(tmp_path / "m.onnx"), "--reference", str(evil))
    assert not marker.exists(), "the file's payload ran"
    assert status == 2
    assert_one_line_error(err, entry)


def test_program_with_native_code_is_refused(program, tmp_path):
    def add_library(entries: dict[str, bytes]) -> None:
        entries["data/aotinductor/model/model.so"] = b"\x7fELF"

    evil = _rewrite(program, tmp_path / "aoti.pt2", add_library)
    with pytest.raises(TorchFileError, match="'data/aotinductor/model/model.so' is AOTInductor native code"):
        load_source(evil)


def test_trusted_program_goes_to_torch_as_is(program, tmp_path):
    """--trust-pickle hands the file to torch.export.load unchanged: its pickles do run."""
    evil, marker, _ = _hostile(program, tmp_path, "sample-inputs")
    try:
        load_program(evil, trust_pickle=True)
    except Exception:  # noqa: BLE001 - the payload is no valid sample input; running it is the point
        pass
    assert marker.exists()


def test_plain_program_loads_and_runs(program):
    source = load_source(program)
    assert [s.name for s in source.specs] == ["x", "key_padding_mask"]
    assert source.module(*source.example_inputs(2, 8)).shape == (2, 8, 16)


# --- archive checks before torch.load ----------------------------------------------------------
def _bomb(tmp_path: Path, inflated: int = 64 << 20) -> Path:
    """A checkpoint whose data.pkl is a deflated run of ``inflated`` zero bytes."""
    good = attn2onnx.save(build_model(ModelConfig(**LAYER)), tmp_path / "good.pt")
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bomb, "w") as dst:
        for info in src.infolist():
            if info.filename.endswith("/data.pkl"):
                dst.writestr(info.filename, bytes(inflated), compress_type=zipfile.ZIP_DEFLATED)
            else:
                dst.writestr(info, src.read(info))
    assert bomb.stat().st_size < inflated // 100
    return bomb


def test_compressed_archive_is_refused_before_torch_reads_it(capsys, tmp_path, monkeypatch):
    bomb = _bomb(tmp_path)

    def must_not_run(*args, **kwargs):
        raise AssertionError("torch.load reached a compressed archive")

    monkeypatch.setattr(torch, "load", must_not_run)
    with pytest.raises(CheckpointError, match="data.pkl' is compressed") as info:
        attn2onnx.load(bomb)
    assert "\n" not in str(info.value)
    with pytest.raises(TorchFileError, match="data.pkl' is compressed"):
        load_source(bomb, trust_pickle=True)
    status, _, err = call(capsys, "export", str(bomb), "-o", str(tmp_path / "x.onnx"))
    assert status == 2
    assert_one_line_error(err, "is compressed")


def test_entry_count_is_bounded(tmp_path, monkeypatch):
    path = attn2onnx.save(build_model(ModelConfig(**LAYER)), tmp_path / "m.pt")
    monkeypatch.setattr("attn2onnx.torch_files.MAX_ENTRIES", 3)
    with pytest.raises(CheckpointError, match="entries, more than a torch file has"):
        attn2onnx.load(path)


def test_legacy_pickle_file_needs_trust(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save(build_model(ModelConfig(**LAYER)), path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="legacy torch file .*--trust-pickle"):
        load_source(path)
    assert load_source(path, trust_pickle=True).module.config.d_model == 16


def test_trusted_pickled_module_loads(tmp_path):
    torch.save(build_model(ModelConfig(**LAYER)), tmp_path / "module.pt")
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_source(tmp_path / "module.pt")
    assert load_source(tmp_path / "module.pt", trust_pickle=True).module.config == ModelConfig(**LAYER)


# --- config sizes before any allocation --------------------------------------------------------
def test_new_with_huge_d_model_fails_fast(capsys, tmp_path):
    status, _, err = call(capsys, "new", "mha", "-o", str(tmp_path / "x.pt"), "--d-model", "400000")
    assert status == 2
    assert_one_line_error(err, "d_model=400000 makes a model of")
    assert "lower d_model" in err and not (tmp_path / "x.pt").exists()


def _checkpoint(tmp_path: Path, edit: Callable[[dict], None]) -> Path:
    """A small LM checkpoint after ``edit`` changed its payload."""
    model = build_model(ModelConfig(family="lm", variant="mha", d_model=16, heads=2, max_len=16, vocab_size=11))
    payload = {"format": FORMAT, "version": VERSION, "config": model.config.to_dict(), "state_dict": model.state_dict()}
    edit(payload)
    torch.save(payload, tmp_path / "edited.pt")
    return tmp_path / "edited.pt"


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("d_model", 400000, "lower d_model"),
        ("d_model", 256, "makes pos \\[16, 256\\], the file holds \\[16, 16\\]"),
        ("vocab_size", 10**9, "lower vocab_size"),
    ],
)
def test_checkpoint_config_larger_than_its_weights_is_refused(tmp_path, monkeypatch, field, value, match):
    path = _checkpoint(tmp_path, lambda payload: payload["config"].update({field: value, "mlp_hidden": None}))
    monkeypatch.setattr("attn2onnx.checkpoint.build_model", None)  # refused before any model is built
    with pytest.raises(CheckpointError, match=f"{field}={value} .*{match}") as info:
        attn2onnx.load(path)
    assert "\n" not in str(info.value)


def test_weights_must_hold_the_values_their_shapes_claim(tmp_path, monkeypatch):
    def stretch(payload: dict) -> None:
        weight = payload["state_dict"]["embed.weight"]
        payload["state_dict"]["embed.weight"] = torch.zeros(1).expand(weight.shape)  # one stored value

    path = _checkpoint(tmp_path, stretch)
    monkeypatch.setattr("attn2onnx.checkpoint.build_model", None)
    with pytest.raises(CheckpointError, match="fewer than their shapes claim"):
        attn2onnx.load(path)


def test_size_errors_name_the_field():
    with pytest.raises(UsageError, match=f"layers={MAX_LAYERS + 1} is more than attn2onnx builds"):
        ModelConfig(layers=MAX_LAYERS + 1)
    with pytest.raises(UsageError, match="lower vocab_size"):
        build_model(ModelConfig(vocab_size=10**10))
    with pytest.raises(UsageError, match="lower max_len"):
        build_model(ModelConfig(max_len=10**9))


@pytest.mark.parametrize(
    "config",
    [
        ModelConfig(family="lm", variant="reuse", layers=4, reuse_schedule=[0, 1, 4, 2]),
        ModelConfig(family="lm", variant="dcmha", tie_embeddings=False),
        ModelConfig(family="encoder", variant="imhsa", patch_size=2, image_size=8),
    ],
    ids=["reuse", "dcmha-untied", "imhsa-image"],
)
def test_state_size_counts_exactly_what_a_checkpoint_holds(config):
    assert state_size(config) == sum(t.numel() for t in build_model(config).state_dict().values())
