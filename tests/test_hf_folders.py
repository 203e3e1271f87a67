"""Hugging Face transformers folders (issue 20 item 1): ``attn2onnx export DIR``.

Tiny random-weight models of 15 architectures (tests/hf_configs.py), saved locally with
save_pretrained, are read as model sources (the installed transformers builds them; weights
from safetensors only), exported with dynamic batch and sequence and checked against the
transformers model on padded batches. By default each architecture runs with one attention
implementation (eager and sdpa alternate, so both are covered on decoders and encoders);
ATTN2ONNX_HF_FULL=1 runs both for every architecture (the whole matrix). The command line
runs end to end (export, optimize for ort / trt / portable, run, validate against the folder)
on one model; pickled weights, a folder's own code without opt-in and a missing transformers
are refused in one line.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import onnx
import pytest
import torch

from attn2onnx.errors import UsageError
from attn2onnx.exporter import ExportError, export
from attn2onnx.sources import load_source, transformers_folder_source
from attn2onnx.validate import check_parity
from hf_configs import ARCHITECTURES, DECODERS, save_quietly, save_tiny
from test_cli_basic import assert_one_line_error, call

pytest.importorskip("transformers")

FULL = bool(os.environ.get("ATTN2ONNX_HF_FULL"))


def _known_failure(name: str, impl: str) -> list:
    if (name, impl) not in KNOWN_FAILURES:
        return []
    raises, reason = KNOWN_FAILURES[name, impl]
    return [pytest.mark.xfail(raises=raises, strict=True, reason=reason)]


# One implementation per architecture by default, both kinds on decoders and encoders.
SDPA_BY_DEFAULT = {"llama", "qwen2", "phi3", "falcon", "opt", "roberta", "vit"}
# What transformers itself does not do (each case checks that it still fails so).
KNOWN_FAILURES = {
    ("bloom", "sdpa"): (UsageError, "transformers has no sdpa attention for BLOOM: refused in one line"),
    ("t5_encoder", "sdpa"): (
        ExportError,
        "T5's sdpa path reshapes the transposed attention output; torch.export cannot view it at symbolic sizes",
    ),
}
CASES = [
    pytest.param(name, impl, id=f"{name}-{impl}", marks=_known_failure(name, impl))
    for name in ARCHITECTURES
    for impl in ("eager", "sdpa")
    if FULL or (impl == "sdpa") == (name in SDPA_BY_DEFAULT)
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A function saving architecture ``name``'s tiny model once per module: its folder."""
    made = {}

    def folder(name: str):
        if name not in made:
            made[name] = save_tiny(name, tmp_path_factory.mktemp(name) / name)
        return made[name]

    return folder


@pytest.mark.parametrize("name,impl", CASES)
def test_folder_exports_with_parity_on_padded_batches(name, impl, folders, tmp_path):
    source = transformers_folder_source(folders(name), attn_implementation=impl)
    assert source.module.model.config._attn_implementation == impl
    out = tmp_path / "m.onnx"
    export(
        source.module,
        source.example_inputs(2, 16),
        out,
        specs=source.specs,
        output_names=source.output_names,
        max_seq=source.max_seq,
    )
    report = check_parity(out, source)
    assert report.passed, [(c.shape, c.max_abs_err) for c in report.comparisons]
    assert any("padding mask" in line for line in report.inputs) or source.specs[0].name == "pixel_values"


def test_inputs_follow_the_architecture(folders):
    llama = load_source(folders("llama"))
    assert llama.module.model.config._attn_implementation == "eager"  # the default: every architecture has it
    assert [(s.name, s.kind) for s in llama.specs] == [
        ("input_ids", "ids"),
        ("attention_mask", "int_mask"),
        ("position_ids", "positions"),
    ]
    assert llama.specs[0].high == 97 and llama.output_names == ["logits"] and llama.max_seq is None
    assert transformers_folder_source(folders("gpt2")).max_seq == 128  # learned positions bound the length
    roberta = transformers_folder_source(folders("roberta"))
    assert [s.name for s in roberta.specs] == ["input_ids", "attention_mask"]
    assert roberta.output_names == ["last_hidden_state"] and roberta.max_seq == 128 - 2  # padding_idx + 1 offset
    vit = transformers_folder_source(folders("vit"))
    assert [(s.name, s.dims) for s in vit.specs] == [("pixel_values", ("batch", 3, 16, 16))]


def test_command_line_end_to_end(folders, capsys, tmp_path):
    """export DIR, optimize for every target, run, validate --reference DIR: all exit 0 with parity."""
    folder = str(folders("llama"))
    stock = str(tmp_path / "m.onnx")
    status, out, err = call(capsys, "export", folder, "-o", stock)
    assert status == 0, err
    assert "MISMATCH" not in out and "ok" in out
    for target in ("ort", "trt", "portable"):
        optimized = str(tmp_path / f"{target}.onnx")
        status, out, err = call(capsys, "optimize", stock, "-o", optimized, "--target", target)
        assert status == 0, err
        status, out, err = call(capsys, "run", optimized)
        assert status == 0, err
        status, out, err = call(capsys, "validate", optimized, "--reference", folder, "--json")
        assert status == 0, (target, err, out)
        assert json.loads(out)["passed"]


def test_sharded_safetensors_load(tmp_path):
    import transformers

    from hf_configs import MODELS

    config_class, kwargs, model_class, _ = MODELS["llama"]
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**kwargs)).eval()
    save_quietly(model, tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    source = load_source(tmp_path)
    ids = torch.randint(0, 97, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.int64)
    with torch.inference_mode():
        want = model(input_ids=ids, attention_mask=mask).logits
        got = source.module(ids, mask, torch.arange(6).expand(2, 6))
    torch.testing.assert_close(got, want)


def test_pickled_weights_are_refused_in_one_line(folders, tmp_path, capsys):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((folders("gpt2") / "config.json").read_text())
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    status, _, err = call(capsys, "export", str(folder), "-o", str(tmp_path / "m.onnx"))
    assert status == 2
    assert_one_line_error(err, "pytorch_model.bin")
    assert "safetensors" in err and not (tmp_path / "m.onnx").exists()


def test_own_code_needs_the_opt_in(folders, tmp_path, capsys):
    folder = tmp_path / "custom"
    folder.mkdir()
    config = json.loads((folders("gpt2") / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomLM"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes((folders("gpt2") / "model.safetensors").read_bytes())
    (folder / "modeling_custom.py").write_text("raise SystemExit('the folder code ran')\n")
    status, _, err = call(capsys, "export", str(folder), "-o", str(tmp_path / "m.onnx"))
    assert status == 2
    assert_one_line_error(err, "--trust-remote-code")
    with pytest.raises(UsageError, match="auto_map"):
        load_source(folder, trust_remote_code=False)


def test_encoder_decoder_is_refused_in_one_line(tmp_path):
    import transformers

    config = transformers.T5Config(vocab_size=97, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
    save_quietly(transformers.T5ForConditionalGeneration(config), tmp_path)
    with pytest.raises(UsageError, match="T5EncoderModel"):
        load_source(tmp_path)


def test_missing_transformers_names_the_extra(folders, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers raises ImportError
    with pytest.raises(UsageError, match=r"pip install attn2onnx\[hf\]"):
        load_source(folders("gpt2"))


def test_dcformer_release_folders_still_take_their_importer(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "dcformer"}))
    with pytest.raises(UsageError, match="no weights"):  # the DCFormer importer's own message
        load_source(tmp_path)


CUSTOM_CONFIG = """from transformers import LlamaConfig


class TinyConfig(LlamaConfig):
    model_type = "tiny_custom"
"""
CUSTOM_MODEL = """from transformers import LlamaForCausalLM

from .configuration_tiny import TinyConfig


class TinyForCausalLM(LlamaForCausalLM):
    config_class = TinyConfig
"""


def custom_code_folder(folders, tmp_path, monkeypatch):
    """The tiny Llama folder with its own modeling code (a LlamaForCausalLM subclass, auto_map)."""
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))  # the code is copied there
    folder = tmp_path / "custom"
    folder.mkdir()
    config = json.loads((folders("llama") / "config.json").read_text())
    config.update(model_type="tiny_custom", architectures=["TinyForCausalLM"])
    config["auto_map"] = {
        "AutoConfig": "configuration_tiny.TinyConfig",
        "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM",
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes((folders("llama") / "model.safetensors").read_bytes())
    (folder / "configuration_tiny.py").write_text(CUSTOM_CONFIG)
    (folder / "modeling_tiny.py").write_text(CUSTOM_MODEL)
    return folder


def test_own_code_runs_with_the_opt_in(folders, tmp_path, monkeypatch):
    folder = custom_code_folder(folders, tmp_path, monkeypatch)
    source = load_source(folder, trust_remote_code=True)
    assert type(source.module.model).__name__ == "TinyForCausalLM"
    assert [s.name for s in source.specs] == ["input_ids", "attention_mask", "position_ids"]
    reference = load_source(folders("llama"))
    inputs = source.example_inputs(2, 6)
    with torch.inference_mode():
        torch.testing.assert_close(source.module(*inputs), reference.module(*inputs))


def test_validate_runs_a_folders_own_code_only_with_the_opt_in(folders, tmp_path, monkeypatch, capsys):
    """validate --reference FOLDER with its own code: refused in one line, run with --trust-remote-code."""
    folder = custom_code_folder(folders, tmp_path, monkeypatch)
    graph = str(tmp_path / "m.onnx")
    assert call(capsys, "export", str(folders("llama")), "-o", graph, "--no-check")[0] == 0
    status, _, err = call(capsys, "validate", graph, "--reference", str(folder), "--shapes", "2x6")
    assert status == 2
    assert_one_line_error(err, "--trust-remote-code")
    trusted = ("--shapes", "2x6", "--trust-remote-code")
    status, _, err = call(capsys, "validate", graph, "--reference", str(folder), *trusted)
    assert status == 0, err


def hf_greedy(model, ids: np.ndarray, mask: np.ndarray, steps: int) -> np.ndarray:
    """transformers' own greedy generate with its KV cache: up to ``steps`` new tokens per row
    (a row that gave EOS goes on with pad id 0, as :func:`finished_at_eos` writes ours)."""
    with torch.inference_mode():
        out = model.generate(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            do_sample=False,
            max_new_tokens=steps,
            pad_token_id=0,
        )
    return np.pad(out[:, ids.shape[1] :].numpy(), ((0, 0), (0, steps + ids.shape[1] - out.shape[1])))


def finished_at_eos(tokens: np.ndarray, eos: int) -> np.ndarray:
    """``tokens`` [B, steps] with every token after a row's first ``eos`` replaced by pad id 0."""
    after = np.cumsum(tokens == eos, axis=1) - (tokens == eos) > 0
    return np.where(after, 0, tokens)


def session_greedy(path, ids: np.ndarray, mask: np.ndarray, steps: int) -> np.ndarray:
    """Greedy tokens of the decode graph at ``path`` for a left-padded batch, positions counted
    per row over the real tokens (as transformers' generate counts them)."""
    from attn2onnx.generate import DecodeSession

    session = DecodeSession(str(path))
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    logits = session.prefill(ids, mask, positions)[:, -1]
    tokens = []
    for _ in range(steps):
        tokens.append(logits.argmax(-1))
        mask = np.concatenate([mask, np.ones((len(ids), 1), np.int64)], axis=1)
        positions = positions[:, -1:] + 1
        logits = session.step(tokens[-1][:, None], mask, positions)[:, -1]
    return np.stack(tokens, axis=1)


def left_padded_prompts(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two prompts of 7 and 4 tokens, the second padded on the left (pad id 0)."""
    ids = rng.integers(3, 97, size=(2, 7))
    mask = np.ones((2, 7), dtype=np.int64)
    ids[1, :3], mask[1, :3] = 0, 0
    return ids, mask


def test_decode_command_line_matches_transformers_generate(folders, capsys, tmp_path, rng):
    """export DIR --decode (its decode check), generate (batch 1) and the graph's greedy tokens
    on a left-padded batch of 2 equal transformers' generate; validate --decode passes."""
    folder = str(folders("llama"))
    path = str(tmp_path / "decode.onnx")
    status, out, err = call(capsys, "export", folder, "-o", path, "--decode")
    assert status == 0, err
    assert "MISMATCH" not in out
    graph = onnx.load(path)
    assert [i.name for i in graph.graph.input][:5] == [
        "input_ids",
        "attention_mask",
        "position_ids",
        "past_key_values.0.key",
        "past_key_values.0.value",
    ]
    cache = graph.graph.input[3].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in cache] == ["batch", 2, "past", 8]  # [B, kv_heads, past, head_dim]
    assert [o.name for o in graph.graph.output][:3] == ["logits", "present.0.key", "present.0.value"]
    model = load_source(folder).module.model
    prompt = [5, 17, 42, 8, 64]
    status, out, err = call(
        capsys, "generate", path, "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", "6", "--json"
    )
    assert status == 0, err
    tokens = json.loads(out)["tokens"]
    got = finished_at_eos(np.array([tokens + [0] * (6 - len(tokens))]), model.generation_config.eos_token_id)
    np.testing.assert_array_equal(got, hf_greedy(model, np.array([prompt]), np.ones((1, 5), np.int64), 6))
    ids, mask = left_padded_prompts(rng)
    got = finished_at_eos(session_greedy(path, ids, mask, 6), model.generation_config.eos_token_id)
    np.testing.assert_array_equal(got, hf_greedy(model, ids, mask, 6))
    status, out, err = call(capsys, "validate", path, "--reference", folder, "--decode")
    assert status == 0, err


DECODE_CASES = [  # every decoder once (its CASES implementation); both with ATTN2ONNX_HF_FULL=1
    pytest.param(name, impl, id=f"{name}-{impl}", marks=_known_failure(name, impl))
    for name in DECODERS
    for impl in ("eager", "sdpa")
    if FULL or (impl == "sdpa") == (name in SDPA_BY_DEFAULT)
]


@pytest.mark.parametrize("name,impl", DECODE_CASES)
def test_decode_graph_matches_transformers_generate(name, impl, folders, tmp_path, rng):
    source = transformers_folder_source(folders(name), attn_implementation=impl)
    lm = source.module.decode_lm()
    path = tmp_path / "decode.onnx"
    lm.export_decode(path)
    assert check_parity(path, lm, decode=True, steps=4).passed
    ids, mask = left_padded_prompts(rng)
    for rows in (slice(0, 1), slice(0, 2)):  # batch 1, then batch 2 with left padding
        got = finished_at_eos(session_greedy(path, ids[rows], mask[rows], 6), lm.model.generation_config.eos_token_id)
        np.testing.assert_array_equal(got, hf_greedy(lm.model, ids[rows], mask[rows], 6))


def test_decode_reference_counts_positions_by_padded_index(folders, rng):
    """validate --decode feeds the decode graph the padded index as positions; the full-sequence
    reference must use the same even where the model would count them from the mask (OPT)."""
    lm = load_source(folders("opt")).module.decode_lm()
    ids, mask = left_padded_prompts(rng)
    ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)
    with torch.inference_mode():
        want = lm.model(input_ids=ids, attention_mask=mask, position_ids=torch.arange(7).expand(2, 7)).logits
        torch.testing.assert_close(lm(ids, mask.bool()), want)
