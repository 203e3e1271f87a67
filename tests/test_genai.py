"""ONNX Runtime GenAI runs the folders :func:`attn2onnx.genai.write_genai_folder` writes, with the
same greedy tokens as ``attn2onnx generate`` and PyTorch, for every causal variant.

The models are test_decode_greedy's (trained on a token cycle so greedy steps have clear
margins; dcmha with a local window on layer 0 that the steps cross). Batch 1: GenAI's tokens
equal ``generate --json``, PyTorch's decode loop and its full forward. Batch 2 (mha, dcmha):
GenAI pads on the right (its padding id after a shorter prompt, masked; positions count the
real tokens; the first token is read at each row's last real one), so its tokens are compared
with ORT's decode graph and PyTorch's decode loop fed those same masks and positions."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch

pytest.importorskip("onnxruntime_genai")
import onnxruntime_genai as og  # noqa: E402

import attn2onnx  # noqa: E402
from attn2onnx import cli  # noqa: E402
from attn2onnx.custom_ops import DOMAIN  # noqa: E402
from attn2onnx.errors import UsageError  # noqa: E402
from attn2onnx.genai import CONFIG_FILE, GENAI_KEY, plan_caches, write_byte_tokenizer, write_genai_folder  # noqa: E402
from attn2onnx.generate import DecodeSession  # noqa: E402
from attn2onnx.models.decode import DecodeLM, cache_specs, export_decode  # noqa: E402
from attn2onnx.models.shared_decode import export_shared_decode  # noqa: E402
from attn2onnx.runtime import native  # noqa: E402
from test_decode_greedy import (  # noqa: E402
    BATCH_PROMPTS,
    CYCLE,
    MARGIN,
    MAX_LEN,
    NEW_TOKENS,
    PROMPT,
    VOCAB,
    full_forward_greedy,
    left_padded,
    new_checkpoint,
    torch_decode_greedy,
    train,
)

CAUSAL = ["mha", "optimised", "efficient", "super", "dcmha", "reuse"]
# layers whose caches are no head-major K / V pair (reuse's layer 0 has no earlier layer to reuse)
PACKED = {"efficient": [True, True], "dcmha": [True, True], "reuse": [False, True]}


def genai_greedy(folder, prompts: list[list[int]], max_length: int) -> tuple[np.ndarray, list]:
    """GenAI's new tokens [B, max_length - longest prompt] for prompts padded on the right with
    its padding id, and its attention mask after the last step."""
    model = og.Model(str(folder))
    config = json.loads((folder / CONFIG_FILE).read_text())
    pad = config["model"]["pad_token_id"]
    longest = max(map(len, prompts))
    ids = np.full((len(prompts), longest), pad, dtype=np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = prompt
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max_length, batch_size=len(prompts))
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    while not generator.is_done():
        generator.generate_next_token()
    tokens = np.stack([generator.get_sequence(row)[longest:] for row in range(len(prompts))])
    return tokens, generator.get_input("attention_mask").tolist()


def right_padded_greedy(step, prompts: tuple[list[int], ...], new: int) -> tuple[np.ndarray, float, list]:
    """Greedy tokens [B, new] of ``step(ids, mask, positions) -> logits [B,T,V]`` (a decode
    loop carrying its caches) fed as GenAI feeds it: prompts padded on the right (id 0, mask 0,
    position 0), each row's first token from its last real position, then one step per token at
    position = that row's count of real tokens so far. Also the least top-1 minus top-2 logit
    and the final mask."""
    lengths = np.array([len(p) for p in prompts])
    ids = np.zeros((len(prompts), lengths.max()), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = prompt
    mask = (np.arange(ids.shape[1]) < lengths[:, None]).astype(np.int64)
    logits = step(ids, mask, np.where(mask == 1, np.arange(ids.shape[1]), 0))[np.arange(len(prompts)), lengths - 1]
    tokens, margins = [], []
    while True:
        top = np.sort(logits, axis=-1)[:, -2:]
        margins.append(float((top[:, 1] - top[:, 0]).min()))
        tokens.append(logits.argmax(-1))
        if len(tokens) == new:
            break
        mask = np.concatenate([mask, np.ones((len(prompts), 1), dtype=np.int64)], axis=1)
        positions = (lengths + len(tokens) - 1)[:, None]
        logits = step(tokens[-1][:, None], mask, positions)[:, -1]
    return np.stack(tokens, axis=1), min(margins), mask.tolist()


def torch_step(model):
    """PyTorch's decode loop (DecodeLM eager) as a step function carrying its caches."""
    wrapper, state = DecodeLM(model), {}

    def step(ids, mask, positions):
        past = state.get("past") or wrapper.empty_past(ids.shape[0])
        with torch.inference_mode():
            out = wrapper(*(torch.from_numpy(np.asarray(a, dtype=np.int64)) for a in (ids, mask, positions)), *past)
        state["past"] = list(out[1:])
        return out[0].numpy()

    return step


def ort_step(path):
    """ORT's decode graph (DecodeSession, generate's engine) as a step function."""
    session = DecodeSession(path)
    return lambda ids, mask, positions: (session.step if session.length else session.prefill)(ids, mask, positions)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """variant -> (trained model, decode graph path), made once per variant."""
    made = {}

    def make(variant):
        if variant not in made:
            folder = tmp_path_factory.mktemp(variant)
            checkpoint = str(folder / "lm.pt")
            new_checkpoint(variant, checkpoint)
            torch.manual_seed(0)
            model = train(attn2onnx.load(checkpoint))
            made[variant] = model, export_decode(model, folder / "lm.decode.onnx").path
        return made[variant]

    return make


@pytest.mark.parametrize("variant", CAUSAL)
def test_greedy_tokens_equal_generate_and_pytorch(variant, exported, tmp_path, capsys) -> None:
    model, decode = exported(variant)
    folder = write_genai_folder(decode, tmp_path / "genai")
    assert [not p.direct for p in folder.layers] == PACKED.get(variant, [False, False])
    custom = any(n.domain == DOMAIN for n in onnx.load(decode).graph.node)
    assert (folder.library is not None) == (custom and native.available())

    got, _ = genai_greedy(folder.path, [PROMPT], len(PROMPT) + NEW_TOKENS)
    capsys.readouterr()
    argv = ["generate", str(decode), "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", str(NEW_TOKENS)]
    assert cli.main([*argv, "--json"]) == 0
    generated = json.loads(capsys.readouterr().out)["tokens"]
    ids, mask = left_padded((PROMPT,))
    want, margin = torch_decode_greedy(model, ids, mask)
    assert margin > MARGIN, f"near-tied logits (margin {margin:.3g}): the comparison would hinge on rounding"
    assert got[0].tolist() == generated == want[0].tolist() == full_forward_greedy(model, ids, mask)[0].tolist()
    assert generated == (CYCLE * 2)[8 : 8 + NEW_TOKENS]  # the cycle: a step that lost its cache would not


@pytest.mark.parametrize("variant", ["mha", "dcmha"])
def test_batch_tokens_equal_generate_and_pytorch(variant, exported, tmp_path) -> None:
    """Two prompts of different lengths (9 and 4: dcmha's window of 7 crossed in the prompt and
    in the steps), padded on the right as GenAI pads them; the graph after optimize --target ort."""
    model, decode = exported(variant)
    optimized = tmp_path / "lm.opt.onnx"  # as generate users run it: mha's attention on MultiHeadAttention
    attn2onnx.optimize(decode, optimized, target="ort")
    folder = write_genai_folder(optimized, tmp_path / "genai")
    new = MAX_LEN - max(map(len, BATCH_PROMPTS))
    got, genai_mask = genai_greedy(folder.path, list(BATCH_PROMPTS), MAX_LEN)
    want, margin, mask = right_padded_greedy(torch_step(model), BATCH_PROMPTS, new)
    assert margin > MARGIN, f"near-tied logits (margin {margin:.3g}): the comparison would hinge on rounding"
    assert genai_mask == mask  # GenAI fed what the references were fed
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(right_padded_greedy(ort_step(optimized), BATCH_PROMPTS, new)[0], want)


def test_dcmha_without_native_library(exported, tmp_path) -> None:
    """native=False: no library in the folder or config; ORT runs DcmhaAttention's function body."""
    _, decode = exported("dcmha")
    folder = write_genai_folder(decode, tmp_path / "genai", native=False)
    config = json.loads((folder.path / CONFIG_FILE).read_text())
    assert folder.library is None and "custom_ops_library" not in config["model"]["decoder"]["session_options"]
    assert not list(folder.path.glob("*.so"))
    got, _ = genai_greedy(folder.path, [PROMPT], len(PROMPT) + NEW_TOKENS)
    assert got[0].tolist() == (CYCLE * 2)[8 : 8 + NEW_TOKENS]


def test_eos_id_stops_generation(exported, tmp_path) -> None:
    _, decode = exported("mha")
    eos = (CYCLE * 2)[8 + 3]  # the 4th greedy token
    folder = write_genai_folder(decode, tmp_path / "genai", eos_id=eos)
    got, _ = genai_greedy(folder.path, [PROMPT], len(PROMPT) + NEW_TOKENS)
    # generate keeps the EOS as its last token; GenAI stops there without adding it to the sequence
    assert got[0].tolist() == (CYCLE * 2)[8 : 8 + 3]


def test_folder_contents_and_metadata(exported, tmp_path) -> None:
    _, decode = exported("dcmha")
    folder = write_genai_folder(decode, tmp_path / "genai")
    config = json.loads((folder.path / CONFIG_FILE).read_text())
    assert config["model"]["vocab_size"] == VOCAB + 1 == config["model"]["eos_token_id"] + 1
    assert config["search"]["max_length"] == config["model"]["context_length"] == MAX_LEN
    meta = json.loads({p.key: p.value for p in onnx.load(folder.path / "model.onnx").metadata_props}[GENAI_KEY])
    # dcmha layer 0: K [32 = 4 heads x 8], V [32], key factors [40 = 2 x 5 x 4], cut at 52
    assert [p["width"] for p in meta["layers"][0]["parts"]] == [32, 32, 40]
    assert meta["layers"][0]["shape"] == ["batch", 1, "past", 52]


def test_refuses_a_cache_with_an_odd_count(tmp_path) -> None:
    """efficient with d_model 9 (3 heads of 3) caches x alone: 9 values per position, no equal
    key / value halves; refused in one line before any export."""
    config = attn2onnx.ModelConfig(
        family="lm", variant="efficient", layers=1, d_model=9, heads=3, max_len=8, vocab_size=VOCAB
    )
    with pytest.raises(UsageError) as err:
        plan_caches(cache_specs(attn2onnx.build_model(config)))
    message = str(err.value)
    assert "\n" not in message and "GenAI cannot hold layer 0's cache" in message and "9 values per position" in message


def test_refuses_bad_outputs_and_eos(exported, tmp_path) -> None:
    _, decode = exported("mha")
    (tmp_path / "file").write_text("")
    for folder, eos, words in (
        (tmp_path / "file", None, "is not a folder"),
        (tmp_path / "missing" / "genai", None, "no such folder"),
        (tmp_path / "genai", VOCAB, "outside the model's vocabulary"),
    ):
        with pytest.raises(UsageError, match=words):
            write_genai_folder(decode, folder, eos_id=eos)
    assert not (tmp_path / "genai").exists()


def test_refuses_a_shared_dcmha_graph(exported, tmp_path) -> None:
    """dcmha with shared KV buffers (``--shared-kv``): GenAI hands the graph growing caches, which
    have no room for CacheUpdate's new rows (the folder was written and failed at GenAI's first
    step); one line, no folder."""
    model, _ = exported("dcmha")
    shared = export_shared_decode(model, tmp_path / "shared.onnx").path
    with pytest.raises(UsageError, match="--genai with --shared-kv is not supported for dcmha"):
        write_genai_folder(shared, tmp_path / "genai")
    assert not (tmp_path / "genai").exists()


def test_byte_tokenizer_ids_are_bytes(exported, tmp_path) -> None:
    """The byte tokenizer, read by GenAI's own tokenizer: UTF-8 text -> its bytes as ids, and back."""
    _, decode = exported("mha")
    folder = write_genai_folder(decode, tmp_path / "genai").path
    write_byte_tokenizer(folder)
    tokenizer = og.Tokenizer(og.Model(str(folder)))
    text = "Beautiful is better than ugly. Ünïcödé ✓ 🙂\n\ttabs  spaces"
    assert tokenizer.encode(text).tolist() == list(text.encode("utf-8"))
    assert tokenizer.decode(np.array(list(text.encode("utf-8")), dtype=np.int32)) == text
    shutil.rmtree(folder)


def test_export_genai_option(exported, tmp_path, capsys) -> None:
    """``export --decode --genai DIR`` writes the folder after the export; bad requests are one
    line, exit 2, before anything is written."""
    checkpoint, out, folder = tmp_path / "lm.pt", tmp_path / "lm.decode.onnx", tmp_path / "genai"
    attn2onnx.save(exported("mha")[0], str(checkpoint))
    for argv, words in (
        (["--genai", str(folder)], "--genai needs --decode"),
        (["--decode", "--genai", str(tmp_path / "missing" / "genai")], "no such folder"),
    ):
        assert cli.main(["export", str(checkpoint), "-o", str(out), "--no-check", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("attn2onnx: error: ") and words in err and err.count("\n") == 1
        assert not out.exists() and not folder.exists()
    dcmha = tmp_path / "dcmha.pt"
    attn2onnx.save(exported("dcmha")[0], str(dcmha))
    argv = ["export", str(dcmha), "-o", str(out), "--decode", "--shared-kv", "--genai", str(folder)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "--genai with --shared-kv is not supported for dcmha" in err and err.count("\n") == 1
    assert not out.exists() and not folder.exists()
    assert cli.main(["export", str(checkpoint), "-o", str(out), "--decode", "--genai", str(folder)]) == 0
    assert f"wrote {folder}: genai_config.json" in capsys.readouterr().out
    got, _ = genai_greedy(folder, [PROMPT], len(PROMPT) + NEW_TOKENS)
    assert got[0].tolist() == (CYCLE * 2)[8 : 8 + NEW_TOKENS]
