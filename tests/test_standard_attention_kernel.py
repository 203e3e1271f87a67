"""StandardAttention (ai.attn2onnx, issue 25 items 2-3): the plain causal / key-padded attention op
on the DcmhaAttention kernel's core, in its single-pass flash form.

Oracle: the contract (variants.md sections 0-1) in float64 numpy, written out here. The kernel
cuts the work into query blocks of up to 64 rows (micro-tiles of 8 rows with AVX-512, 6
otherwise), key chunks of 128 keys (64) and micro-tile columns of 32 (16), and skips chunks no row
of a block sees; each case sits below, at or above such a size on some axis, and is checked on 1
thread against the oracle and for the same bits on 2, 3 and 4 threads. The function body (the
same model without the library) and the torch reference are held to the same oracle.
"""

from __future__ import annotations


import numpy as np
import onnx
import pytest
import torch
from conftest import skip_or_fail
from onnx import TensorProto, helper

import attn2onnx.custom_ops as ops
from attn2onnx.custom_ops.standard_attention.reference import standard_attention_reference
from attn2onnx.runtime import native, session

ATOL, RTOL = 2e-5, 1e-4
NEG = -1e30


@pytest.fixture(scope="module", autouse=True)
def library():
    reason = native.unavailable_reason()
    if reason is not None:
        skip_or_fail(f"native kernel library unavailable: {reason}")


def model(heads, kv_heads=0, causal=0, window=0, scale=0.0, elem=TensorProto.FLOAT) -> onnx.ModelProto:
    """One StandardAttention node on dynamic [B,T,*] inputs, its function body attached; with
    ``elem`` other than FLOAT the float inputs are cast to it and the output back."""
    names = ["q", "k", "v", "key_padding_mask"]
    dims = {"q": ["B", "T", "Q"], "k": ["B", "S", "K"], "v": ["B", "S", "V"], "key_padding_mask": ["B", "S"]}
    inputs = [
        helper.make_tensor_value_info(n, TensorProto.BOOL if n == "key_padding_mask" else TensorProto.FLOAT, dims[n])
        for n in names
    ]
    nodes, args = [], list(names)
    if elem != TensorProto.FLOAT:
        args = [n if n == "key_padding_mask" else f"{n}_low" for n in names]
        nodes += [helper.make_node("Cast", [n], [a], to=elem) for n, a in zip(names, args) if n != a]
    out = "o" if elem == TensorProto.FLOAT else "o_low"
    attrs = dict(num_heads=heads, kv_num_heads=kv_heads, scale=scale, causal=causal, window=window)
    nodes.append(helper.make_node("StandardAttention", args, [out], domain=ops.DOMAIN, **attrs))
    if out != "o":
        nodes.append(helper.make_node("Cast", [out], ["o"], to=TensorProto.FLOAT))
    graph = helper.make_graph(nodes, "sa", inputs, [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)])
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid(ops.DOMAIN, 1)],
        functions=[ops.REGISTRY["StandardAttention"].function_proto()],
        ir_version=10,
    )


def make_feeds(rng, b, t, s, n, d, hk=None, dv=None, pad=None) -> dict[str, np.ndarray]:
    """Random inputs; ``pad``: None (all real), a fraction (random) or (start, stop): a padded run."""
    hk = hk or n
    mask = np.ones((b, s), bool)
    if isinstance(pad, float):
        mask = rng.random((b, s)) >= pad
    elif isinstance(pad, tuple):
        mask[:, pad[0] : pad[1]] = False
    return {
        "q": rng.standard_normal((b, t, n * d)).astype(np.float32),
        "k": rng.standard_normal((b, s, hk * d)).astype(np.float32),
        "v": rng.standard_normal((b, s, hk * (dv or d))).astype(np.float32),
        "key_padding_mask": mask,
    }


def oracle(feeds, heads, kv_heads=0, causal=False, window=0, scale=0.0) -> np.ndarray:
    """The contract in float64: where(allowed, q k^T scale, NEG), softmax, P v, per head."""
    q, k, v = (np.asarray(feeds[x], np.float64) for x in "qkv")
    b, t, _ = q.shape
    s = k.shape[1]
    hk = kv_heads or heads
    d = q.shape[2] // heads
    qh = q.reshape(b, t, heads, d).transpose(0, 2, 1, 3)
    kh = np.repeat(k.reshape(b, s, hk, d).transpose(0, 2, 1, 3), heads // hk, axis=1)
    vh = np.repeat(v.reshape(b, s, hk, -1).transpose(0, 2, 1, 3), heads // hk, axis=1)
    logits = qh @ kh.transpose(0, 1, 3, 2) * (scale or 1 / np.sqrt(d))
    allowed = feeds["key_padding_mask"][:, None, None, :]
    if causal:
        distance = (np.arange(t) + s - t)[:, None] - np.arange(s)[None, :]
        allowed = allowed & (distance >= 0) & ((distance < window) if window else True)
    logits = np.where(allowed, logits, NEG)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return (p @ vh).transpose(0, 2, 1, 3).reshape(b, t, -1)


def run(m, feeds, threads=1, native_kernels=True) -> np.ndarray:
    return session(m, native=native_kernels, threads=threads).run(None, feeds)[0]


# name: (B, T, S, N, Hk, d, dv, causal, window, pad)
CASES = {
    # query blocks (64 rows) and micro-tiles (8 / 6 rows)
    "T63": (1, 63, 63, 2, 0, 8, None, 1, 0, None),
    "T64": (1, 64, 64, 2, 0, 8, None, 1, 0, None),
    "T65": (1, 65, 65, 2, 0, 8, None, 1, 0, None),
    "T129-padded": (2, 129, 129, 3, 0, 5, None, 0, 0, 0.1),
    # key chunks (128 / 64) and micro-tile columns (32 / 16)
    "S127": (1, 20, 127, 2, 0, 8, None, 0, 0, None),
    "S128": (1, 20, 128, 2, 0, 8, None, 0, 0, None),
    "S129": (1, 20, 129, 2, 0, 8, None, 0, 0, None),
    "S31": (2, 17, 31, 3, 0, 4, None, 0, 0, None),
    "S33": (2, 17, 33, 3, 0, 4, None, 0, 0, 0.2),
    "S257-causal-padded": (1, 40, 257, 2, 0, 8, None, 1, 0, 0.05),
    # causal with T != S: a decode step's offset (T < S) and rows that see no key (T > S)
    "decode-T1-S300": (2, 1, 300, 4, 0, 16, None, 1, 0, 0.2),
    "decode-T5-S129": (1, 5, 129, 2, 0, 8, None, 1, 0, None),
    "T<S-70-200": (1, 70, 200, 2, 0, 4, None, 1, 0, 0.1),
    "T>S-65-63": (1, 65, 63, 2, 0, 8, None, 1, 0, None),  # rows t < 2 see no key: uniform
    # local windows on and off the chunk / group edges
    "window-128": (1, 300, 300, 2, 0, 4, None, 1, 128, None),
    "window-129": (1, 300, 300, 2, 0, 4, None, 1, 129, None),
    "window-1": (1, 70, 70, 2, 0, 4, None, 1, 1, None),
    "window-33-T<S": (1, 70, 200, 2, 0, 4, None, 1, 33, 0.1),
    # padded runs: whole chunks, leading keys, all but one, all
    "pad-chunk": (1, 80, 300, 2, 0, 4, None, 0, 0, (128, 256)),
    "pad-leading-37": (2, 70, 160, 2, 0, 4, None, 0, 0, (0, 37)),
    "pad-all-but-one": (1, 66, 130, 2, 0, 4, None, 0, 0, (1, 130)),
    "pad-all-causal": (1, 65, 65, 2, 0, 4, None, 1, 0, (0, 65)),  # every row uniform
    # head layouts: grouped kv heads, dv off the tile width, d = 80 (DCFormer-2.8B)
    "gqa-8-2": (1, 70, 90, 8, 2, 8, None, 1, 0, 0.1),
    "dv37": (1, 70, 140, 2, 0, 8, 37, 1, 0, None),
    "d80-N3": (1, 100, 100, 3, 0, 80, None, 1, 0, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tile_boundaries_match_contract_on_every_thread_count(case, rng):
    b, t, s, n, hk, d, dv, causal, window, pad = CASES[case]
    feeds = make_feeds(rng, b, t, s, n, d, hk, dv, pad)
    m = model(n, hk, causal, window)
    want = oracle(feeds, n, hk, bool(causal), window)
    one = run(m, feeds, threads=1)
    assert one.shape == want.shape
    np.testing.assert_allclose(one, want, rtol=RTOL, atol=ATOL)
    for threads in (2, 3, 4):
        assert np.array_equal(run(m, feeds, threads=threads), one), threads


def test_fully_masked_rows_are_uniform_over_all_keys(rng):
    """variants.md section 0: a row with no allowed key averages every value (not NaN, not 0)."""
    feeds = make_feeds(rng, 2, 12, 40, 2, 8)
    feeds["key_padding_mask"][1] = False
    got = run(model(2, causal=1), feeds)
    np.testing.assert_allclose(got[1], np.broadcast_to(np.tile(feeds["v"][1].mean(0), 1), got[1].shape), atol=2e-5)
    np.testing.assert_allclose(got, oracle(feeds, 2, causal=True), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("elem", [TensorProto.FLOAT16, TensorProto.BFLOAT16])
def test_half_inputs_accumulate_in_fp32(elem, rng):
    feeds = make_feeds(rng, 2, 70, 90, 4, 16, pad=0.2)
    dtype = {TensorProto.FLOAT16: np.float16, TensorProto.BFLOAT16: None}[elem]
    got = run(model(4, causal=1, elem=elem), feeds)
    rounded = {
        k: v.astype(dtype).astype(np.float32) if dtype and v.dtype == np.float32 else v for k, v in feeds.items()
    }
    tol = 2e-3 if elem == TensorProto.FLOAT16 else 3e-2
    np.testing.assert_allclose(got, oracle(rounded, 4, causal=True), rtol=tol, atol=tol)


def test_explicit_scale(rng):
    feeds = make_feeds(rng, 1, 10, 14, 2, 8)
    np.testing.assert_allclose(run(model(2, scale=0.37), feeds), oracle(feeds, 2, scale=0.37), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("case", ["T65", "decode-T5-S129", "window-33-T<S", "gqa-8-2", "pad-all-causal"])
def test_function_body_and_torch_reference_keep_the_contract(case, rng):
    b, t, s, n, hk, d, dv, causal, window, pad = CASES[case]
    feeds = make_feeds(rng, b, t, s, n, d, hk, dv, pad)
    want = oracle(feeds, n, hk, bool(causal), window)
    body = run(model(n, hk, causal, window), feeds, native_kernels=False)
    np.testing.assert_allclose(body, want, rtol=RTOL, atol=ATOL)
    ref = standard_attention_reference(
        *(torch.from_numpy(feeds[x]) for x in ("q", "k", "v", "key_padding_mask")), n, hk, 0.0, bool(causal), window
    )
    np.testing.assert_allclose(ref.numpy(), want, rtol=RTOL, atol=ATOL)


def test_every_safety_case_runs_or_is_refused():
    """tests/fuzz/standard_cases.py: bad shapes, names, attributes and values end in one ORT error
    (the kernel's INVALID_ARGUMENT at run), zero sizes and odd lengths run; never a signal."""
    from fuzz import native_cases, standard_cases

    results = native_cases.run_cases(native.library_path(), module="fuzz.standard_cases")
    broken = native_cases.failures(results, standard_cases.cases())
    assert not broken, "\n".join(f"{case}: {'; '.join(found)}" for case, found in broken.items())
