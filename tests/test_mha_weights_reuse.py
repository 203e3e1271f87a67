"""nn.MultiheadAttention(need_weights=True) whose returned probabilities a later layer reuses
(the reuse-attention style, issue 20 item 4): the folded-head core fuses into ProbAttention
(passes/fuse_reuse.py) for every target with ORT = PyTorch: unmasked, with a key padding mask,
and with a causal attn_mask too; one with a float attn_mask (a bias) is left as exported, with
an --explain reason."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from attn2onnx.exporter import export
from attn2onnx.passes import optimize
from attn2onnx.passes.explain import explain
from attn2onnx.runtime import session

D, H = 32, 4


class ReusedWeights(nn.Module):
    """Layer 1 returns its attention weights (head-averaged, or per head summed here), layer 2
    applies them to its own values."""

    def __init__(self, average: bool) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(D, H, batch_first=True)
        self.v2, self.o2 = nn.Linear(D, D), nn.Linear(D, D)
        self.average = average

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, w = self.attn(x, x, x, need_weights=True, average_attn_weights=self.average)
        w = w if self.average else w.sum(1)
        return y + self.o2(w @ self.v2(y))


class PaddedReusedWeights(ReusedWeights):
    """The same with a key padding mask (True = pad), which torch merges into an additive bias."""

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        y, w = self.attn(x, x, x, key_padding_mask=pad, need_weights=True)
        return y + self.o2(w @ self.v2(y))


class CausalPaddedReusedWeights(ReusedWeights):
    """The same with a causal attn_mask (``triu(ones, 1)``, True = not allowed) and padding."""

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        causal = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
        y, w = self.attn(x, x, x, key_padding_mask=pad, attn_mask=causal, need_weights=True)
        return y + self.o2(w @ self.v2(y))


class BiasedReusedWeights(ReusedWeights):
    """The same with a float attn_mask input (a bias): not fused (ProbAttention takes no bias)."""

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        y, w = self.attn(x, x, x, attn_mask=bias, need_weights=True)
        return y + self.o2(w @ self.v2(y))


def padding(batch: int, seq: int) -> torch.Tensor:
    """True = pad: row i pads its last i keys (never all; with a causal mask every query still
    sees key 0, so no row is all -inf, where PyTorch gives NaN)."""
    pad = torch.zeros(batch, seq, dtype=torch.bool)
    for row in range(1, batch):
        pad[row, -min(row, seq - 1) :] = True
    return pad


def exported(model: nn.Module, inputs: list[torch.Tensor], path) -> str:
    torch.manual_seed(0)
    export(model.eval(), inputs, path)
    return str(path)


MODELS = ["averaged", "per_head", "padded", "causal_padded"]
CASES = [(model, target) for model in MODELS for target in ("ort", "portable")] + [("causal_padded", "trt")]


@pytest.mark.parametrize("model,target", CASES)
def test_reused_weights_fuse_with_parity(model, target, tmp_path):
    torch.manual_seed(0)
    padded = model in ("padded", "causal_padded")
    module = {"padded": PaddedReusedWeights, "causal_padded": CausalPaddedReusedWeights}.get(model, ReusedWeights)
    module = module(model != "per_head").eval()
    inputs = lambda batch, seq: [torch.randn(batch, seq, D)] + ([padding(batch, seq)] if padded else [])  # noqa: E731
    path = exported(module, inputs(2, 8), tmp_path / "m.onnx")
    out = str(tmp_path / "opt.onnx")
    optimize(path, out, target=target)
    ops = [n.op_type for n in onnx.load(out).graph.node]
    assert ops.count("ProbAttention") == 1 and "Softmax" not in ops, ops
    if target == "trt":  # TensorRT's plugin: no ORT run here
        return
    sess = session(out, backend="ort")
    for batch, seq in ((1, 5), (3, 11)):
        feeds = inputs(batch, seq)
        got = sess.run(None, {i.name: x.numpy() for i, x in zip(sess.get_inputs(), feeds)})[0]
        with torch.inference_mode():
            want = module(*feeds).numpy()
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


def test_biased_reused_weights_are_explained(tmp_path):
    torch.manual_seed(0)
    model = BiasedReusedWeights(True).eval()
    path = exported(model, [torch.randn(2, 8, D), torch.randn(8, 8)], tmp_path / "m.onnx")
    outcomes = explain(onnx.load(path), target="ort")
    assert len(outcomes) == 1 and not outcomes[0].fused and outcomes[0].reason
