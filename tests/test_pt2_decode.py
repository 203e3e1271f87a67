"""``attn2onnx export PROGRAM.pt2 --decode`` (issue 20): torch.export programs that take and
return a KV cache in the documented form (attn2onnx.importers.program_decode) -- tiny
random-weight transformers LMs wrapped as a user wraps them, saved with keyword inputs and named
Dims -- give decode graphs in Optimum's names that ``generate``, ``validate --decode`` and
``--genai`` take, with transformers' own greedy tokens (its KV cache) at batch 1 and on a
left-padded batch of 2. Programs in another form are refused in one line."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from hf_configs import MODELS, VOCAB
from test_cli_basic import assert_one_line_error, call
from test_hf_folders import finished_at_eos, hf_greedy, left_padded_prompts, session_greedy

transformers = pytest.importorskip("transformers")

BATCH, SEQ, PAST = 2, 3, 5  # the example the programs are exported at


def tiny_lm(name: str):
    config_class, kwargs, model_class, _ = MODELS[name]
    torch.manual_seed(0)
    return getattr(transformers, model_class)(getattr(transformers, config_class)(**kwargs)).eval()


def run_with_cache(model, input_ids, attention_mask, position_ids, pairs):
    """``model`` on a DynamicCache filled from ``pairs``: its logits and updated (key, value) pairs."""
    cache = transformers.DynamicCache()
    for layer, (key, value) in enumerate(pairs):
        cache.update(key, value, layer)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=True,
    )
    return out.logits, tuple((layer.keys, layer.values) for layer in out.past_key_values.layers)


class PairsLM(torch.nn.Module):
    """The documented form: the cache as a tuple of (key, value) pairs in and out."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, past_key_values):
        return run_with_cache(self.model, input_ids, attention_mask, position_ids, past_key_values)


class FlatLM(torch.nn.Module):
    """The other documented form: flat per-layer tensors (2 layers) in Optimum's names, a dict out."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids,
        attention_mask,
        position_ids,
        past_key_values_0_key,
        past_key_values_0_value,
        past_key_values_1_key,
        past_key_values_1_value,
    ):
        pairs = [(past_key_values_0_key, past_key_values_0_value), (past_key_values_1_key, past_key_values_1_value)]
        logits, present = run_with_cache(self.model, input_ids, attention_mask, position_ids, pairs)
        flat = {f"present.{i}.{kind}": t for i, pair in enumerate(present) for kind, t in zip(("key", "value"), pair)}
        return {"logits": logits, **flat}


class TokenMajorLM(PairsLM):
    """A cache in another layout ([batch, past, kv_heads, head_dim]): not the documented form."""

    def forward(self, input_ids, attention_mask, position_ids, past_key_values):
        pairs = [(k.transpose(1, 2), v.transpose(1, 2)) for k, v in past_key_values]
        logits, present = run_with_cache(self.model, input_ids, attention_mask, position_ids, pairs)
        return logits, tuple((k.transpose(1, 2), v.transpose(1, 2)) for k, v in present)


def save_decode_program(model, wrapper: type, path, heads: int, head_dim: int, batch_max: int = 16) -> str:
    """``wrapper(model)`` saved with torch.export: keyword inputs, named Dims (past from 0)."""
    batch, seq = torch.export.Dim("batch", max=batch_max), torch.export.Dim("seq", max=64)
    past = torch.export.Dim("past", min=0, max=64)
    layers = model.config.num_hidden_layers
    token_major = wrapper is TokenMajorLM
    shape = (BATCH, PAST, heads, head_dim) if token_major else (BATCH, heads, PAST, head_dim)
    cache_dims = {0: batch, 1 if token_major else 2: past}
    generator = torch.Generator().manual_seed(0)
    kwargs = {
        "input_ids": torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator),
        "attention_mask": torch.ones(BATCH, PAST + SEQ, dtype=torch.int64),
        "position_ids": torch.arange(PAST, PAST + SEQ).expand(BATCH, SEQ),
    }
    dims = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: torch.export.Dim.AUTO}}
    dims["position_ids"] = {0: batch, 1: seq}
    if wrapper is FlatLM:
        names = [f"past_key_values_{i}_{kind}" for i in range(layers) for kind in ("key", "value")]
        kwargs.update({name: torch.randn(shape, generator=generator) for name in names})
        dims.update({name: cache_dims for name in names})
    else:
        kwargs["past_key_values"] = tuple(
            (torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)) for _ in range(layers)
        )
        dims["past_key_values"] = tuple((cache_dims, cache_dims) for _ in range(layers))
    program = torch.export.export(wrapper(model), (), kwargs=kwargs, dynamic_shapes=dims)
    torch.export.save(program, path)
    return str(path)


@pytest.fixture(scope="module")
def llama_program(tmp_path_factory):
    model = tiny_lm("llama")
    # batch at most 2: the checks' batch of 3 runs the PyTorch reference in parts
    return model, save_decode_program(model, PairsLM, tmp_path_factory.mktemp("pt2") / "llama.pt2", 2, 8, batch_max=2)


def test_decode_program_matches_transformers_generate(llama_program, capsys, tmp_path, rng):
    """export PROGRAM.pt2 --decode (its decode check), generate (batch 1) and the graph's greedy
    tokens on a left-padded batch of 2 equal transformers' generate; validate --decode passes
    (both check batches of 3, past the program's Dim: its reference runs in parts)."""
    model, program = llama_program
    path = str(tmp_path / "decode.onnx")
    status, out, err = call(capsys, "export", program, "-o", path, "--decode")
    assert status == 0, out + err
    assert "MISMATCH" not in out
    graph = onnx.load(path)
    assert [i.name for i in graph.graph.input] == [
        "input_ids",
        "attention_mask",
        "position_ids",
        *(f"past_key_values.{i}.{kind}" for i in range(2) for kind in ("key", "value")),
    ]
    cache = graph.graph.input[3].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in cache] == ["batch", 2, "past", 8]
    assert [o.name for o in graph.graph.output] == [
        "logits",
        *(f"present.{i}.{kind}" for i in range(2) for kind in ("key", "value")),
    ]
    prompt = [5, 17, 42, 8, 64]
    status, out, err = call(
        capsys, "generate", path, "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", "6", "--json"
    )
    assert status == 0, err
    tokens = json.loads(out)["tokens"]
    eos = model.generation_config.eos_token_id
    got = finished_at_eos(np.array([tokens + [0] * (6 - len(tokens))]), eos)
    np.testing.assert_array_equal(got, hf_greedy(model, np.array([prompt]), np.ones((1, 5), np.int64), 6))
    ids, mask = left_padded_prompts(rng)
    got = finished_at_eos(session_greedy(path, ids, mask, 6), eos)
    np.testing.assert_array_equal(got, hf_greedy(model, ids, mask, 6))
    status, out, err = call(capsys, "validate", path, "--reference", program, "--decode")
    assert status == 0, out + err


def test_decode_program_exports_its_full_forward_without_decode(llama_program, capsys, tmp_path):
    """Without --decode a decode program exports its full-sequence logits (an empty cache):
    input_ids and attention_mask in, logits out, checked on padded batches within its Dims."""
    _, program = llama_program
    path = str(tmp_path / "full.onnx")
    status, out, err = call(capsys, "export", program, "-o", path)
    assert status == 0, out + err
    graph = onnx.load(path)
    assert [i.name for i in graph.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in graph.graph.output] == ["logits"]


def test_flat_optimum_names_and_genai(capsys, tmp_path, rng):
    """GPT-2 (learned positions: max_len from its table) taking flat past_key_values.{i}.key /
    .value keyword tensors and returning a dict: its decode graph gives transformers' greedy
    tokens at batch 1 and 2 (left-padded), and --genai writes the GenAI folder."""
    from attn2onnx.genai import CONFIG_FILE, MODEL_FILE
    from attn2onnx.runtime.metadata import read_decode

    model = tiny_lm("gpt2")
    program = save_decode_program(model, FlatLM, tmp_path / "gpt2.pt2", 4, 8)
    path, genai = str(tmp_path / "decode.onnx"), tmp_path / "genai"
    status, out, err = call(capsys, "export", program, "-o", path, "--decode", "--genai", str(genai))
    assert status == 0, out + err
    assert read_decode(onnx.load(path)).max_len == 128
    assert (genai / MODEL_FILE).is_file() and (genai / CONFIG_FILE).is_file()
    ids, mask = left_padded_prompts(rng)
    eos = model.generation_config.eos_token_id
    for rows in (slice(0, 1), slice(0, 2)):
        got = finished_at_eos(session_greedy(path, ids[rows], mask[rows], 6), eos)
        np.testing.assert_array_equal(got, hf_greedy(model, ids[rows], mask[rows], 6))


def test_other_cache_forms_are_refused_in_one_line(capsys, tmp_path):
    """A cache in another layout, and a program with no cache at all, are refused saying the
    form expected; nothing is written."""
    model = tiny_lm("llama")
    program = save_decode_program(model, TokenMajorLM, tmp_path / "token_major.pt2", 2, 8)
    path = tmp_path / "decode.onnx"
    status, _, err = call(capsys, "export", program, "-o", str(path), "--decode")
    assert status == 2
    assert_one_line_error(err, "[batch, kv_heads, past, head_dim]")
    assert "not alike" in err
    plain = tmp_path / "plain.pt2"
    ids = torch.randint(0, VOCAB, (2, 8))
    model.config.use_cache = False  # logits only
    torch.export.save(torch.export.export(model, (), kwargs={"input_ids": ids}), plain)
    status, _, err = call(capsys, "export", str(plain), "-o", str(path), "--decode")
    assert status == 2
    assert_one_line_error(err, "--decode needs a program that takes and returns a KV cache")
    assert not path.exists()


class PairCache:
    """A cache object of the saver's own, registered as a pytree node only while it saves."""

    def __init__(self, key: torch.Tensor, value: torch.Tensor) -> None:
        self.key, self.value = key, value


class CacheObjectLM(torch.nn.Module):
    def forward(self, input_ids, past_key_values):
        return input_ids * 2, PairCache(past_key_values.key + 1, past_key_values.value + 1)


def test_a_cache_object_is_refused_naming_the_form(capsys, tmp_path):
    """A program holding a cache object (a DynamicCache registered by the code that saved it)
    does not load elsewhere: one line naming the form to save instead."""
    pytree = torch.utils._pytree
    pytree.register_pytree_node(
        PairCache,
        lambda c: ([c.key, c.value], None),
        lambda leaves, _: PairCache(*leaves),
        serialized_type_name=f"{__name__}.PairCache",
        flatten_with_keys_fn=lambda c: ([(pytree.GetAttrKey(k), getattr(c, k)) for k in ("key", "value")], None),
    )
    try:
        cache = PairCache(torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8))
        program = torch.export.export(CacheObjectLM(), (torch.ones(2, 3, dtype=torch.int64), cache))
        program._example_inputs = None  # saved, they would be a pickle (refused before the cache's turn)
        torch.export.save(program, tmp_path / "object.pt2")
    finally:
        pytree._deregister_pytree_node(PairCache)
    status, _, err = call(capsys, "export", str(tmp_path / "object.pt2"), "-o", str(tmp_path / "d.onnx"), "--decode")
    assert status == 2
    assert_one_line_error(err, "it holds a PairCache object")
    assert "per layer a (key, value) pair" in err


@pytest.mark.parametrize(
    "labels,order",
    [
        (["past_key_values_0_0", "past_key_values_0_1", "past_key_values_1_0", "past_key_values_1_1"], [0, 1, 2, 3]),
        (["past_key_values_0_key", "past_key_values_0_value"], [0, 1]),
        (["key_cache.0", "key_cache.1", "value_cache.0", "value_cache.1"], [0, 2, 1, 3]),  # keys first
        (["1", "2", "3", "4"], [0, 1, 2, 3]),  # nothing said: key, value, key, value
        (["past.0.value", "past.0.key"], [1, 0]),
        (["past.0.key", "past.1.key"], None),  # no values
        (["past.0.key", "past.0.value", "past.1.key"], None),  # odd count
    ],
)
def test_cache_tensors_pair_by_name(labels, order):
    from attn2onnx.importers.program_decode import is_cache_label, pair_order

    assert pair_order(labels) == order
    assert all(map(is_cache_label, labels)) or labels[0] == "1"


def test_other_inputs_are_no_cache():
    from attn2onnx.importers.program_decode import is_cache_label

    assert not any(map(is_cache_label, ["input_ids", "attention_mask", "cache_position", "use_cache_flag", "x"]))


def test_own_decode_wrapper_as_a_program(tmp_path):
    """attn2onnx's own DecodeLM (positional inputs, the caches as *past) saved as a program:
    its decode graph passes the decode check and generates the model's own greedy tokens."""
    import attn2onnx
    from attn2onnx.generate import DecodeSession, generate
    from attn2onnx.models.decode import DecodeLM, cache_specs
    from attn2onnx.sources import load_source
    from attn2onnx.validate import check_parity
    from test_decode import full_forward_greedy

    torch.manual_seed(0)
    config = attn2onnx.ModelConfig(family="lm", variant="mha", layers=2, d_model=32, heads=4, max_len=64)
    model = attn2onnx.build_model(config).eval()
    caches = cache_specs(model)
    batch, seq = torch.export.Dim("batch", max=16), torch.export.Dim("seq", max=64)
    past = torch.export.Dim("past", min=0, max=64)
    example = (
        torch.randint(0, config.vocab_size, (BATCH, SEQ)),
        torch.ones(BATCH, PAST + SEQ, dtype=torch.int64),
        torch.arange(PAST, PAST + SEQ).expand(BATCH, SEQ),
        *(torch.randn(c.shape(BATCH, PAST)) for c in caches),
    )
    dims = ({0: batch, 1: seq}, {0: batch, 1: torch.export.Dim.AUTO}, {0: batch, 1: seq})
    program = torch.export.export(
        DecodeLM(model).eval(), example, dynamic_shapes=(*dims, tuple({0: batch, 2: past} for _ in caches))
    )
    torch.export.save(program, tmp_path / "own.pt2")
    lm = load_source(tmp_path / "own.pt2").module.decode_lm()
    assert (lm.config.vocab_size, lm.config.max_len) == (config.vocab_size, 64)  # max_len: the position table
    path = tmp_path / "decode.onnx"
    lm.export_decode(path)
    assert check_parity(path, lm, decode=True, steps=4).passed
    prompt = [5, 17, 42, 8]
    tokens = generate(DecodeSession(str(path)), prompt, 6).tokens
    assert tokens == full_forward_greedy(model, prompt, 6)
