"""passes/fuse_decode_attention.py: the decode graph's standard attention (mha's cache attention)
lowered onto com.microsoft.MultiHeadAttention with past_key / past_value and present outputs by
``optimize --target ort``, computing what PyTorch computes: row by row against the full forward
with left padding, greedy tokens equal, and every row -- fully masked ones included (the contract:
uniform over all keys) -- against the eager decode step at prefill, decode and multi-token steps."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch

import attn2onnx
from attn2onnx.generate import DecodeSession, generate
from attn2onnx.models import decode
from attn2onnx.models.decode import DecodeLM, export_decode
from attn2onnx.passes import optimize
from attn2onnx.passes.pipeline import build_passes
from attn2onnx.runtime import session
from attn2onnx.validate import compare_decode, decode_cases

LAYERS, D, N, MAX_LEN = 4, 32, 4, 64  # 4: shape inference names the keys `seq + past` from layer 2 on
FUSED = "MultiHeadAttention"


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    config = attn2onnx.ModelConfig(family="lm", variant="mha", layers=LAYERS, d_model=D, heads=N, max_len=MAX_LEN)
    return attn2onnx.build_model(config).eval()


@pytest.fixture(scope="module")
def lowered(model, tmp_path_factory) -> str:
    """The mha LM's decode graph after optimize --target ort."""
    folder = tmp_path_factory.mktemp("decode_lowering")
    export_decode(model, folder / "lm.onnx")
    optimize(folder / "lm.onnx", folder / "lm.opt.onnx", target="ort")
    return str(folder / "lm.opt.onnx")


@pytest.fixture(scope="module")
def lowered_fp16(model, tmp_path_factory) -> str:
    """The same in half precision (weights, caches, logits), where an additive mask cannot make a
    fully masked row uniform by itself: the export API with half tracing inputs (``export --decode``
    has no --dtype fp16 yet; the decode session reads fp16 caches)."""
    folder = tmp_path_factory.mktemp("decode_lowering_fp16")
    with pytest.MonkeyPatch.context() as patch:
        fp32_inputs = decode.example_inputs
        patch.setattr(
            decode,
            "example_inputs",
            lambda wrapper: tuple(t.half() if t.is_floating_point() else t for t in fp32_inputs(wrapper)),
        )
        export_decode(copy.deepcopy(model).half(), folder / "lm.onnx")
    optimize(folder / "lm.onnx", folder / "lm.opt.onnx", target="ort")
    return str(folder / "lm.opt.onnx")


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_every_layer_runs_multi_head_attention_with_past_and_present(precision, request) -> None:
    """One MHA per layer reading the cache inputs and writing the present outputs itself: no
    Softmax left, and nothing else reads the caches (no Transpose / Concat copies)."""
    graph = onnx.load(request.getfixturevalue("lowered" if precision == "fp32" else "lowered_fp16")).graph
    fused = [n for n in graph.node if n.op_type == FUSED and n.domain == "com.microsoft"]
    assert len(fused) == LAYERS
    for layer, node in enumerate(fused):
        assert list(node.input[6:]) == [f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"]
        assert list(node.output[1:]) == [f"present.{layer}.key", f"present.{layer}.value"]
        assert not [a for a in node.attribute if a.name == "unidirectional" and a.i]  # causality is in the bias
    assert not [n for n in graph.node if n.op_type == "Softmax"]
    readers = {n.op_type for n in graph.node for i in n.input if i.startswith("past_key_values.")}
    assert readers == {FUSED}


def test_only_target_ort_lowers_decode_attention() -> None:
    names = {target: [name for name, _ in build_passes(target)] for target in ("ort", "trt", "portable")}
    assert "fuse_decode_attention" in names["ort"]
    assert "fuse_decode_attention" not in names["trt"] + names["portable"]


def test_prefill_and_decode_match_full_forward_row_by_row(model, lowered) -> None:
    """validate --decode's check on the lowered graph: left-padded batches, real positions."""
    path = lowered
    meta = DecodeSession(path).meta
    results = compare_decode(path, model, decode_cases(meta, steps=5), steps=5)
    assert results and all(r.passed for r in results), [(r.shape, r.abs_err) for r in results]


def full_forward_greedy(model: torch.nn.Module, prompt: list[int], tokens: int) -> list[int]:
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(tokens):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def test_greedy_tokens_equal_pytorch(model, lowered) -> None:
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    result = generate(DecodeSession(lowered), prompt, 12)
    assert result.tokens == full_forward_greedy(model, prompt, 12)


def contract_mask(batch: int, total: int) -> np.ndarray:
    """Rows: all real; left-padded (a prefill's early rows see no key); all padded (every row
    fully masked); one real token at the end."""
    mask = np.ones((batch, total), dtype=np.int64)
    mask[1, : total // 2] = 0
    mask[2] = 0
    mask[3, :-1] = 0
    return mask


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("past,seq", [(0, 7), (6, 1), (6, 3)], ids=["prefill", "decode", "multi-token"])
def test_every_row_matches_the_eager_step_fully_masked_rows_included(
    model, precision: str, past: int, seq: int, request
) -> None:
    """All rows and every present against the fp32 DecodeLM eager on the same caches: padded query
    rows too, where the contract makes a row with no allowed key uniform over all keys (MHA's own
    masking would not, nor, in fp16, an additive finfo.min bias)."""
    path = request.getfixturevalue("lowered" if precision == "fp32" else "lowered_fp16")
    dtype, tolerance = (np.float32, 1e-5) if precision == "fp32" else (np.float16, 2e-2)
    rng = np.random.default_rng(0)
    batch, total = 4, past + seq
    feeds = {
        "input_ids": rng.integers(0, model.config.vocab_size, (batch, seq)),
        "attention_mask": contract_mask(batch, total),
        "position_ids": np.broadcast_to(np.arange(past, total), (batch, seq)).copy(),
    }
    wrapper = DecodeLM(model)
    caches = [rng.standard_normal(p.shape).astype(dtype) for p in wrapper.empty_past(batch, past)]
    sess = session(path)
    names = [i.name for i in sess.get_inputs()]
    got = sess.run(None, {**feeds, **dict(zip(names[3:], caches))})
    with torch.inference_mode():
        want = wrapper(
            *(torch.from_numpy(feeds[k]) for k in names[:3]), *(torch.from_numpy(c.astype(np.float32)) for c in caches)
        )
    for name, g, w in zip([o.name for o in sess.get_outputs()], got, want):
        np.testing.assert_allclose(g.astype(np.float32), w.numpy(), rtol=tolerance, atol=tolerance, err_msg=name)
