"""Shared KV buffers for Hugging Face transformers folders (issue 21 item 1:
``export DIR --decode --shared-kv``, :mod:`passes.shared_hf_kv`).

A tiny Llama (grouped-query attention: 4 query heads on 2 cache heads, RoPE; with transformers'
eager and sdpa attention) and a tiny GPT-2 are exported as growing-cache decode graphs,
optimised for ORT, and rewritten onto GroupQueryAttention over one max-length buffer per cache.
The shared graph's greedy tokens equal transformers' own generate with its KV cache at batch 1
and on a left-padded batch of 2; its logits equal the growing graph's row by row (the left-pad
rows of the prefill too, whose softmax is uniform over all keys) through prefill, a chunk of
several tokens and single-token steps, and its buffers' valid positions equal the growing caches.
The command line writes and checks the shared graph; a graph whose attention is not fused is
refused in one line.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

pytest.importorskip("transformers")

import attn2onnx  # noqa: E402
from attn2onnx.errors import UsageError  # noqa: E402
from attn2onnx.generate import DecodeSession, generate  # noqa: E402
from attn2onnx.models.shared_decode import share_decode_graph  # noqa: E402
from attn2onnx.runtime.metadata import read_decode  # noqa: E402
from attn2onnx.sources import transformers_folder_source  # noqa: E402
from hf_configs import save_tiny  # noqa: E402
from test_cli_basic import call  # noqa: E402
from test_hf_folders import finished_at_eos, hf_greedy, left_padded_prompts, session_greedy  # noqa: E402

CASES = [("llama", "eager"), ("llama", "sdpa"), ("gpt2", "eager")]
TOTAL, PROMPT, CHUNK = 14, 6, 3
RTOL, ATOL = 1e-5, 1e-5


@pytest.fixture(scope="module", params=CASES, ids=[f"{n}-{i}" for n, i in CASES])
def graphs(request, tmp_path_factory):
    """(growing graph optimised for ORT, shared graph, the transformers model) of one case."""
    name, impl = request.param
    folder = tmp_path_factory.mktemp(f"{name}-{impl}")
    lm = transformers_folder_source(save_tiny(name, folder / name), attn_implementation=impl).module.decode_lm()
    growing, shared = folder / "growing.onnx", folder / "shared.onnx"
    lm.export_decode(growing)
    attn2onnx.optimize(str(growing), str(growing), target="ort")
    share_decode_graph(growing, shared)
    return growing, shared, lm.model


def test_graph_is_shared_gqa(graphs):
    _, shared, _ = graphs
    model = onnx.load(shared)
    assert read_decode(model).shared
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("GroupQueryAttention") == 2 and "MultiHeadAttention" not in ops


def test_tokens_equal_transformers_generate(graphs, rng):
    _, shared, model = graphs
    ids, mask = left_padded_prompts(rng)
    for rows in (slice(0, 1), slice(0, 2)):  # batch 1, then batch 2 with left padding
        got = finished_at_eos(session_greedy(shared, ids[rows], mask[rows], 6), model.generation_config.eos_token_id)
        np.testing.assert_array_equal(got, hf_greedy(model, ids[rows], mask[rows], 6))


def test_rows_equal_growing(graphs):
    """Every row's logits (the second row padded on the left by 4) and every cache's valid
    positions, after prefill, a chunk and single steps; the buffers grow during the loop."""
    growing, shared, _ = graphs
    rng = np.random.default_rng(3)
    ids = rng.integers(3, 97, (2, TOTAL))
    mask = np.ones((2, TOTAL), np.int64)
    mask[1, :4] = 0
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    sessions = DecodeSession(str(growing)), DecodeSession(str(shared), capacity=None)
    done = 0
    for t in [PROMPT, PROMPT + CHUNK, *range(PROMPT + CHUNK + 1, TOTAL + 1)]:
        first, cut, done = t == PROMPT, slice(done, t), t
        want, got = [(s.prefill if first else s.step)(ids[:, cut], mask[:, :t], positions[:, cut]) for s in sessions]
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=f"logits up to {t}")
        for w, g in zip(sessions[0].caches(), sessions[1].caches()):
            np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL, err_msg=f"caches up to {t}")


def test_command_line_writes_and_checks_shared(tmp_path, capsys):
    folder = str(save_tiny("llama", tmp_path / "llama"))
    path = str(tmp_path / "shared.onnx")
    status, out, err = call(capsys, "export", folder, "-o", path, "--decode", "--shared-kv")
    assert status == 0, err
    assert "MISMATCH" not in out and read_decode(onnx.load(path)).shared
    model = transformers_folder_source(tmp_path / "llama").module.model
    got = generate(DecodeSession(path), [5, 17, 42, 8, 64], 6).tokens
    want = hf_greedy(model, np.array([[5, 17, 42, 8, 64]]), np.ones((1, 5), np.int64), 6)[0]
    assert got == [int(t) for t in want[: len(got)]] and len(got) >= 1


def test_unfused_graph_is_refused(tmp_path):
    """A decode graph not optimised for ORT (its attention not fused): one line, nothing written."""
    lm = transformers_folder_source(save_tiny("gpt2", tmp_path / "gpt2")).module.decode_lm()
    plain, out = tmp_path / "plain.onnx", tmp_path / "out.onnx"
    lm.export_decode(plain)
    with pytest.raises(UsageError, match=r"no fused attention layer.*transformers:gpt2: its attention is not"):
        share_decode_graph(plain, out)
    assert not out.exists()
