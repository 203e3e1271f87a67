"""Shared KV buffers (``export --decode --shared-kv``, attn2onnx.models.shared_decode): the
graph whose caches are one max-length buffer each, written in place by GroupQueryAttention
(or, for dcmha, CacheUpdate), computes what the growing-cache decode graph computes, row by row.

Per covered variant (mha, optimised, efficient: its one x cache is one buffer bound to both of
GroupQueryAttention's presents; dcmha: CacheUpdate writes K, V and key factors; and a dcmha LM
whose first layer has a local window of 4 keys, so decoding runs across windows) a tiny LM is
exported both ways (the growing graph optimised for ORT, as generate runs it). A left-padded
batch (one row all padding through the prompt and the first steps, so some rows see no key)
runs prefill, one chunk of several tokens, then single-token steps in both; the shared buffers
start small and grow during the loop, or are fixed at max_len and filled to it.
Every row's logits (padded rows too: their uniform softmax is the contract) and every cache's
valid positions must agree (a window layer's growing cache: the last positions of its buffer).
The variants the shared form does not cover are refused with their reason; the metadata reader
stays strict about the shared form."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

import attn2onnx
from attn2onnx.errors import UsageError
from attn2onnx.generate import DecodeSession, generate
from attn2onnx.models.decode import export_decode
from attn2onnx.models.shared_decode import (
    NOT_SHARED,
    SHARED_VARIANTS,
    check_shareable,
    export_shared_decode,
    share_decode_graph,
)
from attn2onnx.runtime.metadata import MetadataError, read_decode

VOCAB, MAX_LEN, BATCH, PROMPT, CHUNK = 64, 24, 3, 5, 3
RTOL, ATOL = 1e-5, 1e-5


WINDOWED = "dcmha-window"  # dcmha with a local window of 4 keys on its first layer


@pytest.fixture(scope="module", params=[*SHARED_VARIANTS, WINDOWED])
def graphs(request, tmp_path_factory) -> tuple[str, str, torch.nn.Module]:
    """(growing graph optimised for ORT, shared-buffer graph, the PyTorch LM) of one variant."""
    variant, layers = request.param.removesuffix("-window"), None
    if request.param == WINDOWED:
        layers = [{"window": 4}, {}]
    config = attn2onnx.ModelConfig(
        family="lm",
        variant=variant,
        layers=2,
        d_model=32,
        heads=4,
        max_len=MAX_LEN,
        vocab_size=VOCAB,
        layer_options=layers,
    )
    torch.manual_seed(0)
    model = attn2onnx.build_model(config).eval()
    folder = tmp_path_factory.mktemp(request.param)
    growing, shared = folder / "growing.onnx", folder / "shared.onnx"
    export_decode(model, growing)
    attn2onnx.optimize(str(growing), str(growing), target="ort")
    export_shared_decode(model, shared)
    return str(growing), str(shared), model


def left_padded(total: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids, mask, positions [BATCH, total]: row r starts 3r positions late (row 2 is padding
    through the whole prompt: every prefill row of it is fully masked)."""
    ids = np.random.default_rng(1).integers(0, VOCAB, (BATCH, total))
    mask = np.ones((BATCH, total), dtype=np.int64)
    for row in range(BATCH):
        mask[row, : 3 * row] = 0
    return ids, mask, np.ascontiguousarray(np.broadcast_to(np.arange(total), (BATCH, total)))


def run_both(growing: str, shared: str, total: int, capacity: int | None) -> list[tuple[np.ndarray, ...]]:
    """Per step (prefill first): the growing and the shared graph's logits and caches."""
    ids, mask, positions = left_padded(total)
    sessions = DecodeSession(growing), DecodeSession(shared, capacity=capacity)
    steps, done = [], 0
    for t in [PROMPT, PROMPT + CHUNK, *range(PROMPT + CHUNK + 1, total + 1)]:  # prefill, a chunk, single tokens
        first, cut, done = t == PROMPT, slice(done, t), t
        logits = [(s.prefill if first else s.step)(ids[:, cut], mask[:, :t], positions[:, cut]) for s in sessions]
        buffer = sessions[1]._shared[0]
        steps.append((*logits, sessions[0].caches(), sessions[1].caches(), buffer.array.shape[buffer.axis]))
    return steps


def recent(cache: np.ndarray, like: np.ndarray) -> np.ndarray:
    """The last positions of a shared cache's valid part that a growing cache ``like`` holds
    (all of them but in a local-window layer), along the past axis (the one that differs)."""
    axis = next((i for i, (a, b) in enumerate(zip(cache.shape, like.shape)) if a != b), 0)
    return cache[(slice(None),) * axis + (slice(cache.shape[axis] - like.shape[axis], None),)]


@pytest.mark.parametrize("capacity", [None, MAX_LEN], ids=["grown", "max_len"])
def test_rows_equal_growing(graphs, capacity):
    growing, shared, _ = graphs
    steps = run_both(growing, shared, MAX_LEN, capacity)
    sizes = {size for *_, size in steps}
    assert sizes == ({MAX_LEN} if capacity else {2 * PROMPT, 22, MAX_LEN})  # grown twice, then capped at max_len
    for index, (want, got, want_caches, got_caches, _) in enumerate(steps):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=f"logits of step {index}")
        for w, g in zip(want_caches, got_caches):
            np.testing.assert_allclose(recent(g, w), w, rtol=RTOL, atol=ATOL, err_msg=f"caches after step {index}")


def test_greedy_tokens_equal_pytorch(graphs):
    growing, shared, model = graphs
    prompt, new = [3, 1, 4, 1, 5], 12
    tokens = [generate(DecodeSession(path), prompt, new).tokens for path in (growing, shared)]
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(new):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert tokens[1] == tokens[0] == ids[len(prompt) :]


def test_generate_command_runs_shared(graphs):
    """`attn2onnx generate` reads the shared form from the metadata: the growing graph's tokens."""
    growing, shared, _ = graphs
    tokens = []
    for path in (growing, shared):
        command = [sys.executable, "-m", "attn2onnx", "generate", path, "--prompt-ids", "3,1,4", "--max-new-tokens"]
        done = subprocess.run([*command, "9", "--json"], capture_output=True, text=True, check=True)
        tokens.append(json.loads(done.stdout)["tokens"])
    assert tokens[1] == tokens[0] and len(tokens[0]) == 9


def test_rewrite_refuses_graphs_it_cannot_share(graphs, tmp_path):
    """A graph shared already; for standard attention one not optimised for ORT (its attention
    not fused); for dcmha one where something besides the layer reads a cache (it would see the
    buffer): one line each, nothing written."""
    growing, shared, model = graphs
    out = tmp_path / "out.onnx"
    with pytest.raises(UsageError, match="already has shared KV buffers"):
        share_decode_graph(shared, out)
    if read_decode(onnx.load(growing, load_external_data=False)).variant == "dcmha":
        graph = onnx.load(growing)
        cache = graph.graph.input[3].name
        graph.graph.node.append(onnx.helper.make_node("Identity", [cache], ["peek"], name="peek"))
        peek = graph.graph.output.add()
        peek.CopyFrom(graph.graph.input[3])
        peek.name = "peek"
        onnx.save(graph, tmp_path / "peeks.onnx")
        with pytest.raises(UsageError, match=f"cache '{cache}' is read by Identity node 'peek' besides its update"):
            share_decode_graph(tmp_path / "peeks.onnx", out)
    else:
        export_decode(model, tmp_path / "plain.onnx")
        with pytest.raises(UsageError, match="is not read by one fused standard attention layer.*target ort first"):
            share_decode_graph(tmp_path / "plain.onnx", out)
    assert not out.exists()


@pytest.mark.parametrize("variant", sorted(NOT_SHARED))
def test_other_variants_refused_with_reason(variant):
    with pytest.raises(UsageError, match=f"not supported for {variant}: {NOT_SHARED[variant][:20]}"):
        check_shareable(variant)


def _with_decode(model: onnx.ModelProto, edit) -> onnx.ModelProto:
    """A copy of ``model`` with its attn2onnx.decode JSON changed by ``edit``."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    prop = next(p for p in model.metadata_props if p.key == "attn2onnx.decode")
    decode = json.loads(prop.value)
    edit(decode)
    prop.value = json.dumps(decode)
    return model


def test_metadata_stays_strict(graphs):
    _, shared, _ = graphs
    model = onnx.load(shared, load_external_data=False)
    assert read_decode(model).shared
    bad = {
        "one of growing, shared": lambda d: d.update(cache="in-place"),
        "must have past dim 'max_cache'": lambda d: d["caches"][0].update(dims=["batch", 4, "past", 8]),
        "must have past dim 'max_cache' and limit null": lambda d: d["caches"][0].update(limit=4),
        "alias 'nope' is not an output": lambda d: d["caches"][0].update(alias="nope"),
        "alias has 4 dims, but graph tensor 'logits' has rank 3": lambda d: d["caches"][0].update(alias="logits"),
    }
    for message, edit in bad.items():
        with pytest.raises(MetadataError, match=message):
            read_decode(_with_decode(model, edit))
    with pytest.raises(MetadataError, match=r"past dim is 'max_cache' \(want 'past'\)"):  # described as growing
        read_decode(_with_decode(model, lambda d: d.pop("cache")))
