"""Import of DCFormer PyTorch release checkpoints (issue 10): small folders in the release's
layout (tests/dcformer_release.py) converted, exported and compared with an independent
float64 re-implementation of the release's forward; every unmappable input is one line."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
import torch

import attn2onnx
from attn2onnx.importers.dcformer import import_dcformer
from attn2onnx.models import ModelConfig, build_model
from attn2onnx.variants import VariantError
from attn2onnx.variants.dcmha import DcmhaAttention, DcmhaConfig
from dcformer_release import random_release_state, release_forward, write_release_folder
from test_cli_basic import assert_one_line_error, call

# 4 layers tell every window_type apart (layer 3: global in LG, local in LGLL and LGL6; LGL6
# differs from LGLL from layer 4 on, covered by the 8-layer case); window 3 < T bites.
SMALL = dict(n_layer=4, n_head=4, dim=32, vocab_size=50, block_size=64, window_size=3, rope_base=10000.0)
T = 20


def ids(batch: int = 2, seq: int = T, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, SMALL["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(seed))


def imported_logits(folder, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return import_dcformer(folder).double()(input_ids)


@pytest.mark.parametrize("window_type", [None, "LG", "LGLL", "LGL6"])
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("use_sw", [False, True])
def test_import_equals_release_forward(tmp_path, window_type, qk_norm, use_sw):
    """Float64: the imported LM computes the release's forward to rounding, for every window
    type, with and without QK-norm and static mix."""
    config = {**SMALL, "window_type": window_type, "use_qk_norm": qk_norm, "use_sw": use_sw}
    if window_type == "LGL6":
        config["n_layer"] = 8
    state = write_release_folder(tmp_path, config)
    x = ids()
    torch.testing.assert_close(imported_logits(tmp_path, x), release_forward(config, state, x), rtol=0, atol=1e-9)


LAYOUTS = {
    "mqa": dict(config=dict(n_local_heads=1, use_qk_norm=True)),
    "split-qkv": dict(split_qkv=True),
    "bin": dict(fmt="bin"),
    "shards": dict(shards=True),
    "merged-copies": dict(merged=True, config=dict(use_sw=True)),
    "query-wise": dict(config=dict(query_wise=True)),
    "all-global": dict(config=dict(window_size=None, window_type="LGLL")),
    "explicit-sizes": dict(config=dict(intermediate_size=48, n_local_heads=-1, norm_eps=1e-6, head_dim=999)),
}


def write_layout(folder, layout: dict) -> tuple[dict, dict]:
    """A release folder in one of the layouts the release itself reads or writes."""
    config = {**SMALL, "window_type": "LGLL", **layout.get("config", {})}
    state = random_release_state(config)
    stored = dict(state)
    if layout.get("split_qkv"):  # the per-projection keys the release's load hook fuses
        for i in range(config["n_layer"]):
            p = f"layers.{i}.attention."
            for name, part in zip("qkv", stored.pop(p + "wqkv.weight").split(32)):
                stored[f"{p}w{name}.weight"] = part
    if layout.get("merged"):  # stale merged copies (zeros), as a converted checkpoint holds them
        for i in range(config["n_layer"]):
            p = f"layers.{i}.attention.dyn_w_proj."
            stored.update(
                {
                    p + "dw_m": torch.zeros(32, 4 * 16 + 16),
                    p + "qkw_m": torch.zeros(4, 16, 16),
                    p + "sw": torch.zeros(2, 4, 4),
                }
            )
    write_release_folder(folder, config, stored, fmt=layout.get("fmt", "safetensors"))
    if layout.get("shards"):
        from safetensors.torch import save_file

        (folder / "model.safetensors").unlink()
        names = sorted(stored)
        for n, part in enumerate((names[::2], names[1::2])):
            shard = folder / f"model-0000{n + 1}-of-00002.safetensors"
            save_file({k: stored[k].contiguous() for k in part}, str(shard))
    return config, state


@pytest.mark.parametrize("layout", LAYOUTS)
def test_import_layouts(tmp_path, layout):
    config, state = write_layout(tmp_path, LAYOUTS[layout])
    x = ids()
    torch.testing.assert_close(imported_logits(tmp_path, x), release_forward(config, state, x), rtol=0, atol=1e-9)


def test_the_release_semantics_matter(tmp_path):
    """W + 1 window keys and the float16 RoPE table change the logits well beyond float32
    rounding (about 1e-5 here): the comparisons can fail."""
    config = {**SMALL, "window_type": "LGLL"}
    state = write_release_folder(tmp_path, config)
    x = ids()
    reference = release_forward(config, state, x)
    for option, value in (("window_plus_one", False), ("rope_fp16_table", False)):
        model = import_dcformer(tmp_path).double()
        for block in model.trunk.blocks:
            if block.attn.config.window or option != "window_plus_one":
                setattr(block.attn.config, option, value)
        with torch.no_grad():
            assert (model(x) - reference).abs().max() > 1e-4, option


@pytest.mark.parametrize(
    "case",
    [
        dict(window_type=None, use_qk_norm=True, use_sw=True),
        dict(window_type="LG"),
        dict(window_type="LGLL", use_qk_norm=True),
        dict(window_type="LGL6", use_sw=True, n_local_heads=1),
    ],
)
def test_export_folder_validates_against_release(tmp_path, capsys, case):
    """``attn2onnx export DIR -o lm.onnx``: a dynamic-shape model whose ORT logits equal the
    release's forward at several shapes."""
    from attn2onnx.runtime import session

    config = {**SMALL, **case}
    state = write_release_folder(tmp_path / "release", config)
    out = tmp_path / "lm.onnx"
    status, stdout, err = call(capsys, "export", str(tmp_path / "release"), "-o", str(out), "--seq-len", "8")
    assert status == 0, err
    assert "MISMATCH" not in stdout
    graph = onnx.load(str(out), load_external_data=False).graph
    dims = [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim]
    assert all(dims), dims  # batch and sequence are symbolic
    sess = session(str(out))
    for batch, seq in ((1, 5), (3, 17)):
        x = ids(batch, seq, seed=seq)
        logits = sess.run(None, {"input_ids": x.numpy(), "key_padding_mask": np.ones((batch, seq), dtype=bool)})[0]
        expected = release_forward(config, state, x).numpy()
        np.testing.assert_allclose(logits, expected, rtol=0, atol=2e-4)


def test_convert_writes_a_checkpoint(tmp_path, capsys):
    config = {**SMALL, "window_type": "LGLL", "use_qk_norm": True}
    state = write_release_folder(tmp_path / "release", config)
    status, out, err = call(capsys, "convert", str(tmp_path / "release"), "-o", str(tmp_path / "lm.pt"))
    assert status == 0, err
    assert "4 layers (3 local)" in out
    model = attn2onnx.load(tmp_path / "lm.pt").double()
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x), release_forward(config, state, x), rtol=0, atol=1e-9)


def _mutate_state(key: str, value):
    def apply(config: dict, state: dict) -> None:
        if value is None:
            del state[key]
        else:
            state[key] = value

    return apply


def _nonzero_key_side(config: dict, state: dict) -> None:
    config["query_wise"] = True
    state.update(random_release_state(config))  # key sides zero ...
    state["layers.1.attention.dyn_w_proj.qkw"][:, 1] = 0.5  # ... but in layer 1


ERRORS = {
    "unknown key": (
        _mutate_state("layers.0.attention.extra.weight", torch.zeros(3)),
        "'layers.0.attention.extra.weight'",
    ),
    "bad shape": (
        _mutate_state("layers.2.attention.wo.weight", torch.zeros(32, 31)),
        "'layers.2.attention.wo.weight' has shape [32, 31]",
    ),
    "missing key": (_mutate_state("layers.3.feed_forward.w2.weight", None), "lack 'layers.3.feed_forward.w2.weight'"),
    "integer weight": (_mutate_state("norm.weight", torch.ones(32, dtype=torch.int64)), "'norm.weight' is torch.int64"),
    "unknown option": (lambda c, s: c.update(use_mla=True), "option 'use_mla'"),
    "window type": (lambda c, s: c.update(window_type="LLG"), "one of LG, LGLL, LGL6, got 'LLG'"),
    "local heads": (lambda c, s: c.update(n_local_heads=2), "n_local_heads must be -1, n_head or 1"),
    "option type": (lambda c, s: c.update(n_head="4"), "n_head must be int, got '4'"),
    "training path": (lambda c, s: c.update(is_training=True), "is_training=True"),
    "model type": (lambda c, s: c.update(model_type="dcpythia"), "model_type 'dcpythia'"),
    "query wise": (_nonzero_key_side, "layer 1 is query_wise but its key-side dynamic weights"),
    "static mix without use_sw": (
        _mutate_state("layers.0.attention.dyn_w_proj.post_proj.w", 2 * torch.eye(4)[None]),
        "does not set use_sw",
    ),
}


@pytest.mark.parametrize("case", ERRORS)
@pytest.mark.parametrize("command", ["convert", "export"])
def test_unmappable_input_is_one_line(tmp_path, capsys, case, command):
    mutate, message = ERRORS[case]
    config, state = {**SMALL, "window_type": "LGLL"}, random_release_state({**SMALL, "window_type": "LGLL"})
    mutate(config, state)
    write_release_folder(tmp_path / "release", config, state)
    out = tmp_path / ("out.pt" if command == "convert" else "out.onnx")
    status, _, err = call(capsys, command, str(tmp_path / "release"), "-o", str(out))
    assert status == 2
    assert_one_line_error(err, message)
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "release"]


@pytest.mark.parametrize("problem", ["no config", "no weights", "bad json", "corrupt weights", "not a folder"])
def test_broken_folder_is_one_line(tmp_path, capsys, problem):
    folder = tmp_path / "release"
    write_release_folder(folder, SMALL)
    if problem == "no config":
        (folder / "config.json").unlink()
    elif problem == "no weights":
        (folder / "model.safetensors").unlink()
    elif problem == "bad json":
        (folder / "config.json").write_text("{")
    elif problem == "corrupt weights":
        (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    else:
        folder = folder / "config.json"
    status, _, err = call(capsys, "convert", str(folder), "-o", str(tmp_path / "out.pt"))
    assert status == 2
    expected = {
        "no config": "no config.json",
        "no weights": "no weights",
        "bad json": "not valid JSON",
        "corrupt weights": "unreadable",
        "not a folder": "is not a folder",
    }[problem]
    assert_one_line_error(err, expected)
    assert not (tmp_path / "out.pt").exists()


# --- the dcmha / LM options the import uses -----------------------------------------------------
def _layer(**options) -> DcmhaAttention:
    torch.manual_seed(0)
    return DcmhaAttention(DcmhaConfig(d_model=32, n_heads=4, causal=True, rope=True, **options)).double().eval()


def test_window_plus_one_is_a_window_one_longer():
    x = torch.randn(2, 12, 32, dtype=torch.float64)
    plus_one, longer = _layer(window=3, window_plus_one=True), _layer(window=4)
    torch.testing.assert_close(plus_one(x), longer(x), rtol=0, atol=0)
    assert (plus_one(x) - _layer(window=3)(x)).abs().max() > 1e-3


def test_kv_heads_share_keys_and_values():
    """kv_heads=1 equals the N-head layer whose K / V projections repeat one head's weights."""
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    shared = _layer(kv_heads=1, qk_norm=True)
    full = _layer(qk_norm=True)
    tiled = {
        f"{proj}.{name}": getattr(getattr(shared, proj), name).repeat(4, *([1] * (name == "weight")))
        for proj in ("k_proj", "v_proj")
        for name in ("weight", "bias")
    }
    full.load_state_dict({**shared.state_dict(), **tiled})
    assert shared.k_proj.weight.shape == (8, 32)
    torch.testing.assert_close(shared(x), full(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "options", [dict(window=3, window_plus_one=True, kv_heads=2), dict(kv_heads=1, rope_fp16_table=True)]
)
def test_decode_with_the_new_options_equals_forward(options):
    layer = _layer(**options)
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    cache, rows = layer.init_cache(2), []
    for start, stop in ((0, 4), (4, 5), (5, 11)):
        y, cache = layer.forward_step(x[:, start:stop], cache)
        rows.append(y)
    torch.testing.assert_close(torch.cat(rows, dim=1), layer(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(window_plus_one=True), "window_plus_one needs a window"),
        (dict(kv_heads=3), "kv_heads must divide n_heads 4"),
    ],
)
def test_new_dcmha_options_are_checked(options, message):
    with pytest.raises(VariantError, match=message):
        DcmhaConfig(d_model=32, n_heads=4, causal=True, **options)


def test_layer_options_and_norm_eps():
    config = ModelConfig(
        variant="dcmha",
        d_model=32,
        heads=4,
        layers=3,
        norm_eps=1e-5,
        layer_options=[{"window": 2}, {}, {"window": 5, "window_plus_one": True}],
    )
    assert [c.window_keys for c in config.attention_configs()] == [2, 0, 6]
    model = build_model(config)
    assert model.norm.eps == 1e-5 and model.trunk.blocks[0].norm1.eps == 1e-5
    assert ModelConfig.from_dict(config.to_dict()) == config
    for bad, message in (
        ([{}], "one dict per layer (3)"),
        ([{}, {}, 3], "entries are dicts"),
        ([{}, {"d_model": 8}, {}], "'d_model' is not a variant option"),
    ):
        with pytest.raises(attn2onnx.UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
            ModelConfig(variant="dcmha", d_model=32, heads=4, layers=3, layer_options=bad)
    assert not math.isnan(model(torch.zeros(1, 4, dtype=torch.long)).sum().item())
    json.dumps(config.to_dict())  # a checkpoint's config stays plain data
