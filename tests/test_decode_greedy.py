"""Greedy tokens of every causal variant, end to end as a user makes them: ``attn2onnx new``
-> a few training steps -> ``export --decode`` -> ``optimize --target ort`` -> ``generate
--json``, equal to PyTorch's own decode loop and to re-running the full forward per token.

A random-init model's logits are near ties, so a greedy comparison would hinge on rounding:
each model is trained (80 AdamW steps, seconds) on a fixed cycle of 32 tokens in which every
token comes twice and every pair of consecutive tokens once, so the next token depends on the
last two (attention matters), and every greedy step's margin (top-1 minus top-2 logit) is
asserted to be far above ORT's rounding differences, so the test cannot pass on ties.
Batch 1 goes through the CLI; batch 2 with different prompt lengths (left padding) through
:class:`attn2onnx.generate.DecodeSession`. dcmha has a local window on layer 0 (RoPE, QK-norm)
and its prompts end before and after the window, so the steps cross it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import attn2onnx
from attn2onnx import cli
from attn2onnx.generate import DecodeSession
from attn2onnx.models.decode import DecodeLM

# Every token twice, every consecutive pair (cyclically) once.
CYCLE = [10, 7, 6, 14, 2, 0, 13, 15, 12, 9, 11, 5, 3, 4, 8, 1, 13, 10, 3, 14, 7, 12, 0, 5, 11, 8, 4, 15, 6, 1, 2, 9]
VOCAB, MAX_LEN, NEW_TOKENS = 16, 32, 24
TRAIN_STEPS, TRAIN_BATCH, LEARNING_RATE = 80, 16, 2e-2
WINDOW = 8  # dcmha layer 0: its cache keeps 7 positions
MARGIN = 0.5  # least top-1 minus top-2 logit at any greedy step; ORT differs from PyTorch by ~1e-5
PROMPT = CYCLE[3:8]  # batch 1: 5 tokens, shorter than the window; the steps cross it
BATCH_PROMPTS = (CYCLE[10:19], CYCLE[20:24])  # batch 2: 9 tokens (beyond the window) and 4, left padded
assert len(PROMPT) < WINDOW - 1 < len(PROMPT) + NEW_TOKENS and len(BATCH_PROMPTS[0]) + NEW_TOKENS - 1 <= MAX_LEN


def new_checkpoint(variant: str, path: str) -> None:
    """A random-init LM checkpoint: ``attn2onnx new``; dcmha through the API, as its window is
    on one layer only (the CLI's --option sets every layer)."""
    if variant == "dcmha":
        config = attn2onnx.ModelConfig(
            family="lm",
            variant="dcmha",
            layers=2,
            d_model=32,
            heads=4,
            max_len=MAX_LEN,
            vocab_size=VOCAB,
            options={"rope": True, "qk_norm": True},
            layer_options=[{"window": WINDOW}, {}],
        )
        attn2onnx.save(attn2onnx.build_model(config), path)
        return
    argv = ["new", variant, "-o", path, "--family", "lm", "--layers", "2", "--d-model", "32", "--heads", "4"]
    assert cli.main([*argv, "--max-len", str(MAX_LEN), "--vocab-size", str(VOCAB)]) == 0


def train(model: torch.nn.Module) -> torch.nn.Module:
    """TRAIN_STEPS of AdamW on random windows of the repeated CYCLE (fixed seeds); eval mode."""
    data = torch.tensor(CYCLE * 4)
    generator = torch.Generator().manual_seed(1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    model.train()
    for _ in range(TRAIN_STEPS):
        starts = torch.randint(0, len(data) - MAX_LEN, (TRAIN_BATCH,), generator=generator)
        x = torch.stack([data[s : s + MAX_LEN] for s in starts])
        y = torch.stack([data[s + 1 : s + MAX_LEN + 1] for s in starts])
        loss = F.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def left_padded(prompts: tuple[list[int], ...]) -> tuple[np.ndarray, np.ndarray]:
    """ids [B, longest] (padding id 0) and attention mask (1 = real) of prompts padded on the left."""
    longest = max(map(len, prompts))
    ids = np.zeros((len(prompts), longest), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt) :] = prompt
        mask[row, longest - len(prompt) :] = 1
    return ids, mask


def with_one_more(mask: np.ndarray) -> np.ndarray:
    """The attention mask after one more real token per row."""
    return np.concatenate([mask, np.ones((mask.shape[0], 1), dtype=mask.dtype)], axis=1)


def torch_decode_greedy(model: torch.nn.Module, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, float]:
    """Greedy tokens [B, NEW_TOKENS] of PyTorch's decode loop (DecodeLM eager, caches carried,
    positions = padded index) and the least top-1 minus top-2 logit over every row and step."""
    wrapper = DecodeLM(model)
    batch, length = ids.shape
    tokens, margins = [], []
    with torch.inference_mode():
        positions = torch.arange(length).expand(batch, length)
        out = wrapper(torch.from_numpy(ids), torch.from_numpy(mask), positions, *wrapper.empty_past(batch))
        while True:
            top = out[0][:, -1].topk(2).values
            margins.append(float((top[:, 0] - top[:, 1]).min()))
            tokens.append(out[0][:, -1].argmax(-1))
            if len(tokens) == NEW_TOKENS:
                break
            mask = with_one_more(mask)
            positions = torch.full((batch, 1), length + len(tokens) - 1)
            out = wrapper(tokens[-1][:, None], torch.from_numpy(mask), positions, *out[1:])
    return torch.stack(tokens, dim=1).numpy(), min(margins)


def full_forward_greedy(model: torch.nn.Module, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Greedy tokens [B, NEW_TOKENS] re-running the whole sequence through the PyTorch forward."""
    ids, mask = torch.from_numpy(ids), torch.from_numpy(mask).bool()
    start = ids.shape[1]
    with torch.inference_mode():
        for _ in range(NEW_TOKENS):
            token = model(ids, mask)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, token], dim=1)
            mask = torch.cat([mask, torch.ones_like(token, dtype=torch.bool)], dim=1)
    return ids[:, start:].numpy()


def ort_decode_greedy(path: str, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Greedy tokens [B, NEW_TOKENS] of the decode graph in ORT: prefill, then one step per token."""
    session = DecodeSession(path)
    logits = session.prefill(ids, mask)
    tokens = []
    while True:
        tokens.append(logits[:, -1].argmax(-1))
        if len(tokens) == NEW_TOKENS:
            break
        mask = with_one_more(mask)
        logits = session.step(tokens[-1][:, None], mask)
    return np.stack(tokens, axis=1)


@pytest.mark.parametrize("variant", ["mha", "optimised", "efficient", "super", "dcmha", "reuse"])
def test_greedy_tokens_equal_pytorch(variant, tmp_path, capsys) -> None:
    checkpoint, trained = str(tmp_path / "lm.pt"), str(tmp_path / "trained.pt")
    decode, optimized = str(tmp_path / "lm.decode.onnx"), str(tmp_path / "lm.opt.onnx")
    new_checkpoint(variant, checkpoint)
    torch.manual_seed(0)  # dropout-free models; the seed pins anything else random in training
    model = train(attn2onnx.load(checkpoint))
    attn2onnx.save(model, trained)
    assert cli.main(["export", trained, "-o", decode, "--decode", "--no-check"]) == 0
    assert cli.main(["optimize", decode, "-o", optimized, "--target", "ort"]) == 0
    capsys.readouterr()

    prompt = ",".join(map(str, PROMPT))
    assert cli.main(["generate", optimized, "--prompt-ids", prompt, "--max-new-tokens", str(NEW_TOKENS), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["tokens"]
    ids, mask = left_padded((PROMPT,))
    want, margin = torch_decode_greedy(model, ids, mask)
    assert margin > MARGIN, f"near-tied logits (margin {margin:.3g}): the comparison would hinge on rounding"
    assert got == want[0].tolist() == full_forward_greedy(model, ids, mask)[0].tolist()
    # The model continues the cycle, which takes the last two tokens: a decode step that lost
    # its cache would not (every token comes twice in CYCLE, with different successors).
    assert got == (CYCLE * 2)[8 : 8 + NEW_TOKENS]

    ids, mask = left_padded(BATCH_PROMPTS)
    want, margin = torch_decode_greedy(model, ids, mask)
    assert margin > MARGIN, f"near-tied logits (margin {margin:.3g}): the comparison would hinge on rounding"
    np.testing.assert_array_equal(ort_decode_greedy(optimized, ids, mask), want)
    np.testing.assert_array_equal(full_forward_greedy(model, ids, mask), want)
