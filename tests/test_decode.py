"""Decode export (``attn2onnx export --decode``), ``attn2onnx generate`` and ``validate --decode``.

Each model is exported once per module (exports dominate the time): mha through the CLI (with its
built-in check), dcmha with RoPE, QK-norm and a local window on layer 0 through the API, and the
other causal variants (optimised, efficient, super with a random WA, reuse) through the API."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

import attn2onnx
from attn2onnx import cli
from attn2onnx.errors import UsageError
from attn2onnx.generate import DecodeSession, generate
from attn2onnx.models.decode import DECODE_KEY, DecodeLM, check_decodable, export_decode
from attn2onnx.runtime.metadata import DecodeMeta, require_decode
from attn2onnx.validate import compare_decode, decode_cases

GREEDY_TOKENS = 10
WINDOW = 4  # dcmha layer 0: 4 keys, so its cache keeps 3 positions


def tiny_lm(variant: str, **kwargs) -> torch.nn.Module:
    config = attn2onnx.ModelConfig(family="lm", variant=variant, layers=2, d_model=32, heads=4, max_len=64, **kwargs)
    return attn2onnx.build_model(config).eval()


@pytest.fixture(scope="module")
def mha(tmp_path_factory) -> tuple[torch.nn.Module, str]:
    """mha LM exported by the CLI (export --decode runs its prefill + decode check: exit 0)."""
    folder = tmp_path_factory.mktemp("mha")
    model = tiny_lm("mha")
    attn2onnx.save(model, folder / "lm.pt")
    assert cli.main(["export", str(folder / "lm.pt"), "-o", str(folder / "lm.onnx"), "--decode"]) == 0
    return model, str(folder / "lm.onnx")


@pytest.fixture(scope="module")
def dcmha(tmp_path_factory) -> tuple[torch.nn.Module, str]:
    path = tmp_path_factory.mktemp("dcmha") / "lm.onnx"
    model = tiny_lm("dcmha", options={"rope": True, "qk_norm": True}, layer_options=[{"window": WINDOW}, {}])
    export_decode(model, path)
    return model, str(path)


def full_forward_greedy(model: torch.nn.Module, prompt: list[int], tokens: int) -> list[int]:
    """Greedy tokens re-running the whole sequence through the PyTorch forward every step."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(tokens):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def torch_decode_greedy(model: torch.nn.Module, prompt: list[int], tokens: int) -> list[int]:
    """Greedy tokens from PyTorch's decode loop: DecodeLM eager, caches carried between steps."""
    wrapper = DecodeLM(model)
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = wrapper(ids, torch.ones_like(ids), torch.arange(len(prompt))[None], *wrapper.empty_past(1))
        generated = []
        for step in range(tokens):
            generated.append(int(out[0][0, -1].argmax()))
            length = len(prompt) + step
            token = torch.tensor([[generated[-1]]])
            out = wrapper(token, torch.ones(1, length + 1, dtype=torch.int64), torch.tensor([[length]]), *out[1:])
    return generated


def test_graph_inputs_outputs_follow_optimum(mha, dcmha) -> None:
    """Names, Optimum's layout and dynamic dims; a window layer's cache has its own past dim;
    the metadata says what each cache holds."""

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    graph = onnx.load(mha[1]).graph
    inputs = {v.name: dims(v) for v in graph.input}
    assert list(inputs)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert inputs["attention_mask"] == ["batch", "past+seq"]
    assert inputs["past_key_values.1.value"] == ["batch", 4, "past", 8]
    assert {v.name: dims(v) for v in graph.output}["present.0.key"] == ["batch", 4, "past+seq", 8]
    model = onnx.load(dcmha[1])
    inputs = {v.name: dims(v) for v in model.graph.input}
    assert inputs["past_key_values.0.key_factors"] == ["batch", "past_window3", 2, 5, 4]
    assert inputs["past_key_values.1.key"] == ["batch", "past", 4, 8]  # token-major: what DcmhaAttention reads
    meta = json.loads({p.key: p.value for p in model.metadata_props}[DECODE_KEY])
    assert [c["limit"] for c in meta["caches"]] == [3, 3, 3, None, None, None]
    assert "compose factors" in meta["caches"][2]["holds"]


@pytest.mark.parametrize("which", ["mha", "dcmha"])
def test_prefill_and_decode_match_full_forward_row_by_row(which, request) -> None:
    """Left-padded batches (rows starting at different points), several prompt lengths, and for
    dcmha prompts that end before and after the window so the steps cross it."""
    model, path = request.getfixturevalue(which)
    cases = decode_cases(decode_meta(path), steps=5)
    assert (3, WINDOW) in cases or which == "mha"
    results = compare_decode(path, model, cases, steps=5)
    assert len(results) == len(cases) and all(r.passed for r in results), results
    assert max(r.max_abs_err for r in results) < 1e-5


def test_window_layer_cache_keeps_only_its_window(dcmha) -> None:
    session = DecodeSession(dcmha[1])
    session.prefill(np.arange(10, dtype=np.int64)[None])
    lengths = [value.shape()[1] for value in session.past]  # dcmha caches are token-major
    assert lengths == [WINDOW - 1] * 3 + [10] * 3


@pytest.mark.parametrize("which", ["mha", "dcmha"])
def test_greedy_generate_equals_pytorch_decode_loop(which, request) -> None:
    model, path = request.getfixturevalue(which)
    prompt = [72, 101, 108, 108, 111]
    got = generate(DecodeSession(path), prompt, GREEDY_TOKENS).tokens
    assert got == torch_decode_greedy(model, prompt, GREEDY_TOKENS)
    assert got == full_forward_greedy(model, prompt, GREEDY_TOKENS)


def test_cli_generate_json_and_progress_line(mha, capsys) -> None:
    status = cli.main(["generate", mha[1], "--prompt", "Hi", "--max-new-tokens", "4", "--json"])
    out, err = capsys.readouterr()
    assert status == 0
    result = json.loads(out)
    assert result["prompt_ids"] == [72, 105] and len(result["tokens"]) == 4
    assert result["tokens"] == full_forward_greedy(mha[0], [72, 105], 4)
    assert "UTF-8 bytes" in err and "tokens/s" in err.splitlines()[-1]
    sampled = []
    for _ in range(2):
        assert (
            cli.main(
                [
                    "generate",
                    mha[1],
                    "--prompt-ids",
                    "1,2",
                    "--max-new-tokens",
                    "6",
                    "--temperature",
                    "1.5",
                    "--top-k",
                    "3",
                    "--seed",
                    "7",
                    "--json",
                ]
            )
            == 0
        )
        sampled.append(json.loads(capsys.readouterr().out)["tokens"])
    assert sampled[0] == sampled[1]  # seeded


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--prompt-ids", "1,x"], "comma-separated integers"),
        (["--prompt-ids", "300"], "outside the model's vocabulary"),
        (["--prompt", "a", "--max-new-tokens", "65"], "exceed the model's max_len 64"),
    ],
)
def test_cli_generate_errors_are_one_line(mha, capsys, argv, match) -> None:
    assert cli.main(["generate", mha[1], *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("attn2onnx: error: ") and match in err[0]


def test_cli_validate_decode_and_refusals(mha, tmp_path, capsys) -> None:
    ckpt = str(tmp_path / "lm.pt")
    attn2onnx.save(mha[0], ckpt)
    assert cli.main(["validate", mha[1], "--reference", ckpt, "--decode", "--steps", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["passed"]
    plain = str(tmp_path / "plain.onnx")
    assert cli.main(["export", ckpt, "-o", plain, "--no-check"]) == 0
    capsys.readouterr()
    assert cli.main(["generate", plain, "--prompt", "a"]) == 2
    assert "not a decode graph" in capsys.readouterr().err
    assert cli.main(["export", ckpt, "-o", str(tmp_path / "x.onnx"), "--decode", "--static"]) == 2
    assert "--static is not supported with --decode" in capsys.readouterr().err


def test_text_prompt_needs_a_byte_vocabulary() -> None:
    from argparse import Namespace

    from attn2onnx.commands.generate import prompt_ids

    with pytest.raises(UsageError, match="--prompt-ids"):
        prompt_ids(Namespace(prompt="hi", prompt_ids=None), 65)
    assert prompt_ids(Namespace(prompt=None, prompt_ids="3,4"), 65) == ([3, 4], False)


def test_a_layer_without_a_decode_step_is_refused() -> None:
    model = tiny_lm("mha")
    model.trunk.blocks[1].attn = torch.nn.Identity()
    with pytest.raises(UsageError, match="^decode export not supported for mha yet$"):
        check_decodable(model)
    with pytest.raises(UsageError, match="causal LM"):
        check_decodable(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("variant", ["optimised", "efficient", "super", "reuse"])
def test_other_variants_decode_exactly(variant, tmp_path) -> None:
    """Export and parity (left padding, prefill + steps) for the remaining causal variants;
    super with a random WA and bias so its mixing matters."""
    model = tiny_lm(variant)
    if variant == "super":
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "wa" in name:
                    p.normal_(0.0, 0.3)
    export_decode(model, tmp_path / "lm.onnx")
    results = compare_decode(str(tmp_path / "lm.onnx"), model, [(1, 1), (3, 6)], steps=3)
    assert all(r.passed for r in results), results
    inputs = [i.name for i in onnx.load(tmp_path / "lm.onnx").graph.input]
    expected = {
        "efficient": ["past_key_values.0.x", "past_key_values.1.x"],
        "reuse": ["past_key_values.0.key", "past_key_values.0.value", "past_key_values.1.value"],
    }
    assert inputs[3:] == expected.get(variant, [f"past_key_values.{i}.{n}" for i in (0, 1) for n in ("key", "value")])


def decode_meta(path: str) -> DecodeMeta:
    return require_decode(onnx.load(path), path)


def test_run_without_inputs_feeds_a_decode_step_after_past_positions(dcmha, tmp_path, capsys) -> None:
    """`run` on a decode graph makes inputs that keep its contract (caches of --past positions,
    a window layer's of at most its window, attention_mask past + seq long): it runs, and its
    logits are the PyTorch decode step's on the same inputs."""
    from attn2onnx.io_spec import specs_from_onnx
    from attn2onnx.runtime.decode_inputs import random_decode_inputs

    model, path = dcmha
    out = tmp_path / "out.npz"
    assert cli.main(["run", path, "--batch", "2", "--seq-len", "2", "--past", "5", "-o", str(out)]) == 0
    outputs, meta = np.load(out), decode_meta(path)
    for cache in meta.caches:  # past + seq = 7 positions, a window layer's min(7, 3)
        held = 7 if cache.limit is None else WINDOW - 1
        want = [2 if d == "batch" else held if isinstance(d, str) else d for d in cache.dims]
        assert list(outputs[cache.output].shape) == want, cache
    feeds = random_decode_inputs(specs_from_onnx(onnx.load(path)), meta, 2, 2, 5)
    assert feeds["attention_mask"].shape == (2, 7) and feeds["position_ids"].tolist() == [[5, 6], [5, 6]]
    with torch.inference_mode():
        want = DecodeLM(model)(*(torch.from_numpy(v) for v in feeds.values()))[0].numpy()
    np.testing.assert_allclose(outputs["logits"], want, rtol=1e-4, atol=1e-5)
    assert cli.main(["run", path]) == 0  # default past: 8 (layer 0 holds 3)
    assert "present.1.key_factors: shape [1, 24, 2, 5, 4]" in capsys.readouterr().out


def test_run_past_fits_max_len_and_only_decode_graphs_take_it(dcmha, tmp_path, capsys) -> None:
    assert cli.main(["run", dcmha[1], "--seq-len", "60", "--past", "5"]) == 2
    assert capsys.readouterr().err.strip() == "attn2onnx: error: --past 5 + --seq-len 60 exceeds the model's max_len 64"
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", "seq"])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", "seq"])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "plain", [x], [y])
    onnx.save(onnx.helper.make_model(graph), tmp_path / "plain.onnx")
    assert cli.main(["run", str(tmp_path / "plain.onnx"), "--past", "3"]) == 2
    assert "--past applies to decode graphs" in capsys.readouterr().err


def cut_caches(feeds: dict, meta: DecodeMeta, keep: int, window: bool) -> None:
    """Keep the first ``keep`` positions of every window (or every full) cache."""
    for cache in meta.caches:
        if (cache.limit is not None) == window:
            axis = next(i for i, d in enumerate(cache.dims) if isinstance(d, str) and d != "batch")
            feeds[cache.input] = np.take(feeds[cache.input], range(keep), axis=axis)


CONTRACT_BREAKS = {  # name: (change to valid inputs of seq 2 after 5 past positions, error text)
    "mask one too long": (lambda f, m: f.update(attention_mask=np.ones((1, 8), np.int64)), "must cover past + seq = 7"),
    "mask shorter than seq": (lambda f, m: f.update(attention_mask=np.ones((1, 1), np.int64)), "fewer than the 2 new"),
    "window caches short": (lambda f, m: cut_caches(f, m, 2, window=True), "must hold min(past, 3) = 3"),
    "full caches short": (lambda f, m: cut_caches(f, m, 4, window=False), "must cover past + seq = 6"),
    "caches differ": (lambda f, m: f.update({k: f[k][:, :4] for k in f if "1.key_factors" in k}), "past is 4 here"),
}


@pytest.mark.parametrize("change, match", CONTRACT_BREAKS.values(), ids=CONTRACT_BREAKS)
def test_run_refuses_inputs_that_break_the_decode_contract(dcmha, tmp_path, capsys, change, match) -> None:
    """Inputs whose attention_mask, full caches and window caches disagree on the past length
    are refused in one line (ORT would run them and compute nothing meaningful)."""
    from attn2onnx.io_spec import specs_from_onnx
    from attn2onnx.runtime.decode_inputs import random_decode_inputs

    path, meta = dcmha[1], decode_meta(dcmha[1])
    feeds = random_decode_inputs(specs_from_onnx(onnx.load(path)), meta, 1, 2, 5)
    change(feeds, meta)
    np.savez(tmp_path / "in.npz", **feeds)
    assert cli.main(["run", path, "--inputs", str(tmp_path / "in.npz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("attn2onnx: error: ") and match in err[0], err
