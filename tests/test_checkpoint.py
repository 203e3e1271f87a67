"""attn2onnx checkpoints: save / load round trips for every variant and family, atomic
writes, and a one-line error for every file that is not a loadable checkpoint."""

from __future__ import annotations

import os

import pytest
import torch

import attn2onnx
from attn2onnx import CheckpointError, ModelConfig, UsageError, VariantError, build_model
from attn2onnx.checkpoint import FORMAT, VERSION, read_checkpoint
from attn2onnx.variants import VARIANTS

TINY = dict(d_model=16, heads=2, max_len=12, vocab_size=11, num_classes=3)
CASES = [(family, name) for name, info in VARIANTS.items() for family in info.families]


def tiny(family: str = "lm", variant: str = "mha", **overrides) -> torch.nn.Module:
    options = dict(TINY, family=family, variant=variant, seed=3)
    options.update(overrides)
    return build_model(ModelConfig(**options))


def sample_input(model) -> tuple[torch.Tensor, ...]:
    c = model.config
    gen = torch.Generator().manual_seed(0)
    if c.family == "layer":
        return (torch.randn(2, 6, c.d_model, generator=gen),)
    if c.is_image:
        return (torch.randn(2, c.channels, c.image_size, c.image_size, generator=gen),)
    ids = torch.randint(0, c.vocab_size, (2, 6), generator=gen)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    return (ids, mask)


def _perturb(model) -> None:
    """Move every weight off its initial value so a round trip cannot pass by re-initialising."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))


@pytest.mark.parametrize("family,variant", CASES, ids=[f"{f}-{v}" for f, v in CASES])
def test_round_trip_gives_identical_outputs(tmp_path, family, variant):
    model = tiny(family, variant).eval()
    _perturb(model)
    path = attn2onnx.save(model, tmp_path / "m.pt")
    loaded = attn2onnx.load(path)
    assert not loaded.training
    assert loaded.config == model.config and type(loaded) is type(model)
    x = sample_input(model)
    with torch.no_grad():
        assert torch.equal(loaded(*x), model(*x))


def test_round_trip_keeps_options_schedule_and_image(tmp_path):
    cases = [
        tiny("lm", "dcmha", options={"rope": True, "window": 4, "qk_norm": True}, tie_embeddings=False, mlp="gelu"),
        tiny("lm", "reuse", layers=3, reuse_schedule=[0, 1, 2]),
        tiny("encoder", "super", image_size=6, patch_size=2, channels=1, max_len=10),
        tiny("layer", "mha", options={"causal": True}),
    ]
    for i, model in enumerate(cases):
        _perturb(model)
        loaded = attn2onnx.load(attn2onnx.save(model, tmp_path / f"{i}.pt"))
        assert loaded.config.to_dict() == model.config.to_dict()
        x = sample_input(model)
        with torch.no_grad():
            assert torch.equal(loaded(*x), model.eval()(*x))


def test_file_layout_is_plain_data(tmp_path):
    model = tiny()
    attn2onnx.save(model, tmp_path / "m.pt")
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    assert set(payload) == {"format", "version", "config", "state_dict"}
    assert (payload["format"], payload["version"]) == (FORMAT, VERSION) == ("attn2onnx", 1)
    assert payload["config"] == model.config.to_dict() and isinstance(payload["config"], dict)
    assert payload["state_dict"].keys() == model.state_dict().keys()


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "m.pt"
    attn2onnx.save(tiny(seed=1), path)
    before = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        attn2onnx.save(tiny(seed=2), path)
    assert path.read_bytes() == before  # the old checkpoint is untouched
    assert os.listdir(tmp_path) == ["m.pt"]  # and no temporary file is left behind
    monkeypatch.undo()
    attn2onnx.save(tiny(seed=2), path)  # overwriting works
    assert path.read_bytes() != before and os.listdir(tmp_path) == ["m.pt"]


def test_save_errors(tmp_path):
    with pytest.raises(UsageError, match="build_model"):
        attn2onnx.save(torch.nn.Linear(2, 2), tmp_path / "x.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        attn2onnx.save(tiny(), tmp_path / "missing" / "x.pt")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        attn2onnx.save(tiny(), tmp_path)
    assert os.listdir(tmp_path) == []


def test_load_moves_to_map_location(tmp_path):
    path = attn2onnx.save(tiny(), tmp_path / "m.pt")
    model = attn2onnx.load(path, map_location="cpu")
    assert all(p.device.type == "cpu" for p in model.parameters())


# --- files that are not checkpoints ---------------------------------------------------------
def _save_payload(tmp_path, payload, name="x.pt"):
    path = tmp_path / name
    torch.save(payload, path)
    return path


def _good_payload() -> dict:
    model = tiny()
    return {"format": FORMAT, "version": VERSION, "config": model.config.to_dict(), "state_dict": model.state_dict()}


def _one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text, text
    return text


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file: .*nope.pt"):
        attn2onnx.load(tmp_path / "nope.pt")
    with pytest.raises(IsADirectoryError):
        attn2onnx.load(tmp_path)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda p: p.write_bytes(b""), "not a PyTorch file"),
        (lambda p: p.write_bytes(b"hello, this is text\n"), "not an attn2onnx checkpoint"),
        (lambda p: p.write_bytes(os.urandom(4096)), "not an attn2onnx checkpoint"),
    ],
    ids=["empty", "text", "random-bytes"],
)
def test_garbage_files(tmp_path, make, match):
    path = tmp_path / "x.pt"
    make(path)
    with pytest.raises(CheckpointError, match=match) as info:
        attn2onnx.load(path)
    assert str(path) in _one_line(info.value)


def test_truncated_checkpoint(tmp_path):
    path = attn2onnx.save(tiny(), tmp_path / "m.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a PyTorch file") as info:
        attn2onnx.load(path)
    _one_line(info.value)


@pytest.mark.parametrize(
    "payload,match",
    [
        (torch.zeros(3), "without the attn2onnx header"),
        ({"weight": torch.zeros(2)}, "bare state_dict"),
        ({"format": "other", "version": 1}, "without the attn2onnx header"),
        ([1, 2, 3], "without the attn2onnx header"),
    ],
    ids=["tensor", "state-dict", "other-format", "list"],
)
def test_foreign_pytorch_files(tmp_path, payload, match):
    with pytest.raises(CheckpointError, match=match) as info:
        attn2onnx.load(_save_payload(tmp_path, payload))
    _one_line(info.value)


def test_wrong_version(tmp_path):
    payload = _good_payload() | {"version": 2}
    with pytest.raises(CheckpointError, match="version 2 is not supported .*version 1"):
        attn2onnx.load(_save_payload(tmp_path, payload))


def test_unknown_variant(tmp_path):
    payload = _good_payload()
    payload["config"]["variant"] = "flash-banana"
    with pytest.raises(VariantError, match="x.pt: unknown variant 'flash-banana'") as info:
        attn2onnx.load(_save_payload(tmp_path, payload))
    _one_line(info.value)


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda p: p["config"].update(colour="blue"), "damaged model config .*colour"),
        (lambda p: p["config"].update(layers=-1), "damaged model config .*layers"),
        (lambda p: p.pop("state_dict"), "damaged attn2onnx checkpoint"),
        (lambda p: p["state_dict"].pop("embed.weight"), "weights do not match .*embed.weight"),
        (lambda p: p["state_dict"].update({"embed.weight": torch.zeros(3, 3)}), "weights do not match .*embed.weight"),
    ],
    ids=["unknown-key", "bad-value", "no-state-dict", "missing-weight", "wrong-shape"],
)
def test_damaged_checkpoints(tmp_path, edit, match):
    payload = _good_payload()
    edit(payload)
    with pytest.raises(CheckpointError, match=match) as info:
        attn2onnx.load(_save_payload(tmp_path, payload))
    _one_line(info.value)


class _Exploit:
    """Unpickling this would create a file: weights_only loading must refuse before that."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_pickled_objects_are_refused_without_running_them(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        torch.save({"format": FORMAT, "version": VERSION, "config": _Exploit(str(target))}, f)
    assert not target.exists()
    with pytest.raises(CheckpointError, match="pickled Python objects") as info:
        attn2onnx.load(path)
    assert not target.exists()
    _one_line(info.value)
    module_path = _save_payload(tmp_path, torch.nn.Linear(2, 2), "module.pt")
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        read_checkpoint(module_path)
