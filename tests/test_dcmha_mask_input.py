"""DcmhaAttention's optional boolean ``attn_mask`` input (docs/ops.md), end to end.

Arbitrary masks ([T,S] and [B,N,T,S] with broadcast axes, fully masked rows, T != S, T = 1,
with causal and window): the C++ kernel, the ONNX function body (the ``attn_mask`` overload, run
by ORT without the library) and the PyTorch reference op all equal the float64 oracle of
tests/oracles with the mask ANDed in; the Triton kernel too, under Triton's interpreter. Bad
masks are one-line errors. The DCFormer release layer whose mask is a graph input fuses into one
DcmhaAttention with that input, and computes what eager PyTorch computes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper

from conftest import skip_or_fail
from corpus_dcformer.release_style import MaskInputLayer, release_layer
from dcformer_release import random_release_state
from test_native_kernels import NAMES, dcmha_model, library, make_inputs, oracle, run  # noqa: F401 (fixture)

import attn2onnx
from attn2onnx.custom_ops import InvalidModelError, check_model
from attn2onnx.custom_ops.dcmha_attention import dcmha_attention_reference
from attn2onnx.onnx_io import attach_functions
from attn2onnx.passes import optimize_model
from attn2onnx.passes._ir_utils import count_ops

ROOT = Path(__file__).resolve().parents[1]
RTOL, ATOL = 1e-5, 2e-5

# name: (B, T, S, N, causal, window, mask form: one letter per axis, "1" = broadcast)
CASES = {
    "per-head-plain": (2, 33, 33, 4, 0, 0, "BNTS"),
    "batch-causal": (2, 40, 40, 4, 1, 0, "B1TS"),
    "shared-2d-many-chunks": (1, 600, 600, 2, 1, 0, "TS"),  # blocked path, several key chunks
    "padding-like-decode": (2, 1, 57, 4, 1, 0, "B11S"),  # T = 1: the direct path
    "heads-window-T<S": (1, 6, 300, 3, 1, 5, "1NTS"),
    "window-row-broadcast": (1, 70, 70, 3, 1, 9, "BN1S"),
    "one-for-all-T>S": (2, 12, 7, 2, 0, 0, "11TS"),
    "decode-long-per-head": (1, 1, 700, 3, 0, 0, "BNTS"),  # direct path, several key splits
}


def masked_model(form: str, causal: int, window: int, use_static_mix: int = 1) -> onnx.ModelProto:
    """test_native_kernels' one-node model with an ``attn_mask`` graph input of ``form`` passed as
    the 8th input; ``attach_functions`` names the overload and attaches its body, as export does."""
    model = dcmha_model(causal, window, use_static_mix)
    model.graph.node[-1].input.append("attn_mask")
    dims = [c if c.isalpha() else int(c) for c in form]
    model.graph.input.append(helper.make_tensor_value_info("attn_mask", TensorProto.BOOL, dims))
    attach_functions(model)
    return model


def random_mask(rng, b: int, t: int, s: int, n: int, form: str) -> np.ndarray:
    """A random mask of ``form`` with one row that sees no key (where the mask has rows)."""
    sizes = {"B": b, "N": n, "T": t, "S": s}
    mask = rng.random([sizes.get(c, 1) for c in form]) < 0.6
    if "T" in form:
        mask[..., t // 2, :] = False
    return mask


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_body_and_reference_match_the_oracle(case, rng):
    b, t, s, n, causal, window, form = CASES[case]
    feeds = make_inputs(rng, b, t, s, n, 8, pad=0.2)
    mask = random_mask(rng, b, t, s, n, form)
    model = masked_model(form, causal, window)
    want = oracle(feeds, causal=bool(causal), window=window, use_static_mix=True, attn_mask=mask)
    feeds["attn_mask"] = mask
    np.testing.assert_allclose(run(model, feeds), want, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(run(model, feeds, native_kernels=False), want, rtol=RTOL, atol=ATOL)
    tensors = [torch.from_numpy(feeds[name]) for name in NAMES]
    got = torch.ops.attn2onnx.dcmha_attention(*tensors, 0.0, bool(causal), window, True, torch.from_numpy(mask))
    np.testing.assert_allclose(got.numpy(), want, rtol=RTOL, atol=ATOL)


def test_all_true_mask_changes_no_bit_and_absent_mask_keeps_the_plain_node(rng):
    feeds = make_inputs(rng, 2, 37, 37, 4, 8, pad=0.25)
    plain = dcmha_model(1, 6, 1)
    attach_functions(plain)
    assert [n.overload for n in plain.graph.node] == [""] and all(f.overload == "" for f in plain.functions)
    expected = run(plain, feeds)
    with_mask = dict(feeds, attn_mask=np.ones((2, 1, 37, 37), bool))
    np.testing.assert_array_equal(run(masked_model("B1TS", 1, 6), with_mask), expected)


def test_threads_give_bit_identical_results_with_a_mask(rng):
    feeds = make_inputs(rng, 2, 300, 300, 3, 8, pad=0.1)
    feeds["attn_mask"] = random_mask(rng, 2, 300, 300, 3, "BNTS")
    model = masked_model("BNTS", 1, 0)
    np.testing.assert_array_equal(run(model, feeds, threads=1), run(model, feeds, threads=2))


@pytest.mark.parametrize(
    "dims, elem, message",
    [
        ([2, 4, 9], TensorProto.BOOL, "input attn_mask must have rank 2 [T|1,S|1] or rank 4 [B|1,N|1,T|1,S|1]"),
        ([2, 1, 9, 7], TensorProto.BOOL, "input attn_mask axis 3 must be S = 9 (from k axis 1) or 1, found 7"),
        ([3, 4, 9, 9], TensorProto.BOOL, "input attn_mask axis 0 must be B = 2 (from q axis 0) or 1, found 3"),
        ([9, 9], TensorProto.FLOAT, "input attn_mask must be tensor(bool), found tensor(float)"),
    ],
)
def test_bad_masks_are_one_line_errors(dims, elem, message):
    model = masked_model("B1TS", 1, 0)
    fixed = {"B": 2, "T": 9, "S": 9, "N": 4, "d": 8, "F": 5}
    for value in model.graph.input:
        shape = value.type.tensor_type.shape.dim
        for dim in shape:
            if dim.dim_param:
                dim.dim_value = fixed[dim.dim_param]
    (mask,) = [v for v in model.graph.input if v.name == "attn_mask"]
    mask.CopyFrom(helper.make_tensor_value_info("attn_mask", elem, dims))
    with pytest.raises(InvalidModelError) as caught:
        check_model(model)
    assert message in str(caught.value) and "\n" not in str(caught.value), caught.value


def test_reference_rejects_a_bad_mask():
    q = torch.zeros(1, 3, 2, 4)
    args = [q, q, q, torch.zeros(1, 3, 2, 5, 2), torch.zeros(1, 3, 2, 5, 2), torch.ones(1, 3, dtype=torch.bool)]
    with pytest.raises(ValueError, match="attn_mask must be a bool tensor"):
        dcmha_attention_reference(*args, torch.zeros(2, 2, 2), 0.0, False, 0, False, torch.ones(1, 3, 3))


# ------------------------------------------------------------------ Triton, interpreted
TRITON_WORKER = """
import json, torch
from attn2onnx.custom_ops.dcmha_attention.triton_kernel import dcmha_attention_triton
from attn2onnx.custom_ops.dcmha_attention.reference import dcmha_attention_reference
g = torch.Generator().manual_seed(0)
errors = {}
CASES = [(2, 7, 11, 3, True, 0, (2, 1, 7, 11)), (1, 20, 20, 2, True, 5, (20, 20)),
         (2, 1, 33, 3, True, 0, (2, 3, 1, 33)), (1, 17, 23, 4, False, 0, (1, 4, 17, 23))]
for B, T, S, N, causal, window, shape in CASES:
    q, k, v = (torch.randn(B, L, N, 8, generator=g) for L in (T, S, S))
    qf, kf = (0.5 * torch.randn(B, L, 2, 5, N, generator=g) for L in (T, S))
    kpm, wb = torch.rand(B, S, generator=g) > 0.2, 0.3 * torch.randn(2, N, N, generator=g)
    m = torch.rand(*shape, generator=g) < 0.6
    if m.shape[-2] > 1:
        m[..., 0, :] = False
    args = (q, k, v, qf, kf, kpm, wb)
    got = dcmha_attention_triton(*args, 0.0, causal, window, True, m).double()
    want = dcmha_attention_reference(*(x.double() if x.is_floating_point() else x for x in args), 0.0, causal, window,
                                     True, m)
    errors[str(shape)] = ((got - want).abs().max() / want.abs().max()).item()
print(json.dumps(errors))
"""


def test_triton_kernel_honours_the_mask_interpreted():
    """Triton decides interpreter or compiler when a kernel is decorated: a fresh process."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        skip_or_fail("triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", TRITON_WORKER], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    errors = __import__("json").loads(proc.stdout.strip().splitlines()[-1])
    assert len(errors) == 4 and max(errors.values()) < 1e-5, errors


# ------------------------------------------------------------------ fusion: the release layer's mask input
CONFIG = dict(vocab_size=64, n_head=4, dim=32, rope_base=10000.0, n_layer=1, window_size=None)


@pytest.fixture(scope="module")
def mask_input_layer(tmp_path_factory):
    """The release layer with its mask as a forward argument, exported as a user would."""
    layer = MaskInputLayer(release_layer(CONFIG, random_release_state(CONFIG, seed=2)), 10000.0, 32).eval()
    path = tmp_path_factory.mktemp("mask_input") / "layer.onnx"
    attn2onnx.export(layer, (torch.randn(2, 9, 32), torch.rand(2, 1, 9, 9) < 0.7), path)
    return layer, path


def test_release_layer_with_a_mask_input_fuses_and_matches_eager(mask_input_layer):
    layer, path = mask_input_layer
    stock = onnx.load(path)
    fused, _ = optimize_model(stock, target="ort")
    counts = count_ops(ir.serde.deserialize_model(fused))
    assert counts.get("ai.attn2onnx::DcmhaAttention") == 1 and "Softmax" not in counts, counts
    (node,) = [n for n in fused.graph.node if n.op_type == "DcmhaAttention"]
    assert len(node.input) == 8 and node.overload == "attn_mask"
    rng = np.random.default_rng(0)
    names = [i.name for i in stock.graph.input]
    for batch, seq in [(1, 5), (2, 11)]:
        x = rng.standard_normal((batch, seq, 32)).astype(np.float32)
        random = rng.random((batch, 1, seq, seq)) < 0.6
        random[:, :, 1] = False  # a row that sees nothing: uniform, as in eager (fill finfo(fp16).min)
        causal = np.broadcast_to(np.tril(np.ones((seq, seq), bool)), (batch, 1, seq, seq)).copy()
        for mask in (random, causal):
            with torch.no_grad():
                want = layer(torch.from_numpy(x), torch.from_numpy(mask)).numpy()
            for native in (True, False):
                got = attn2onnx.runtime.session(fused, native=native).run(None, dict(zip(names, (x, mask))))[0]
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)


def test_optimize_cli_reports_the_fusion(mask_input_layer, tmp_path):
    _, path = mask_input_layer
    out = tmp_path / "fused.onnx"
    proc = subprocess.run(
        ["attn2onnx", "optimize", str(path), "-o", str(out), "--target", "ort", "--explain"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "fused DcmhaAttention x1" in proc.stdout, proc.stdout
    assert "attention cores: 1, fused 1" in proc.stdout, proc.stdout
