"""The native ORT kernel library (attn2onnx.runtime.native): DcmhaAttention's fused C++ kernel.

Oracle: the float64 numpy pieces of tests/oracles (logits, compose, masked softmax) put together
as the op contract of docs/ops.md; the torch reference op and the ONNX function body
(the same model run without the library) are compared as well.

The kernel tests need the library: it is built on first use from the ORT headers that
scripts/fetch_ort_headers.sh fetches. Without them the tests skip, except under CI (CI=true or
ATTN2ONNX_REQUIRE_NATIVE=1), where a missing library is a failure.
"""

from __future__ import annotations

import ctypes
import json
import os

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from oracles._common import allowed_mask, apply_probs, logits, masked_softmax
from oracles.dcmha import compose

import attn2onnx.custom_ops as ops
import attn2onnx.custom_ops.torch_ops  # noqa: F401  (registers torch.ops.attn2onnx.*)
from attn2onnx.runtime import native, session, session_options

NAMES = ["q", "k", "v", "q_factors", "k_factors", "key_padding_mask", "static_mix"]


@pytest.fixture(scope="module", autouse=True)
def library():
    reason = native.unavailable_reason()
    if reason is not None:
        if os.environ.get("CI") or os.environ.get("ATTN2ONNX_REQUIRE_NATIVE"):
            pytest.fail(f"native kernel library unavailable under CI: {reason}")
        pytest.skip(f"native kernel library unavailable: {reason}")
    return native.library_path()


def dcmha_model(causal=0, window=0, use_static_mix=0, scale=0.0, elem=TensorProto.FLOAT) -> onnx.ModelProto:
    """One DcmhaAttention node with dynamic shapes, its function body (and DcmhaCompose's)
    attached. With ``elem`` other than FLOAT the float inputs are cast to it before the node and
    the output back to float after it (the node itself runs in ``elem``)."""
    dims = {
        "q": "BTNd",
        "k": "BSNd",
        "v": "BSNd",
        "q_factors": "BT2FN",
        "k_factors": "BS2FN",
        "key_padding_mask": "BS",
        "static_mix": "2NN",
    }
    inputs = [
        helper.make_tensor_value_info(
            name,
            TensorProto.BOOL if name == "key_padding_mask" else TensorProto.FLOAT,
            [int(c) if c.isdigit() else c for c in dims[name]],
        )
        for name in NAMES
    ]
    nodes, args = [], list(NAMES)
    if elem != TensorProto.FLOAT:
        args = [name if name == "key_padding_mask" else f"{name}_low" for name in NAMES]
        nodes += [helper.make_node("Cast", [name], [arg], to=elem) for name, arg in zip(NAMES, args) if name != arg]
    out = "o" if elem == TensorProto.FLOAT else "o_low"
    nodes.append(
        helper.make_node(
            "DcmhaAttention",
            args,
            [out],
            domain=ops.DOMAIN,
            scale=scale,
            causal=causal,
            window=window,
            use_static_mix=use_static_mix,
        )
    )
    if out != "o":
        nodes.append(helper.make_node("Cast", [out], ["o"], to=TensorProto.FLOAT))
    graph = helper.make_graph(
        nodes, "dcmha", inputs, [helper.make_tensor_value_info("o", TensorProto.FLOAT, list("BTNd"))]
    )
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid(ops.DOMAIN, 1)],
        functions=list(ops.function_protos().values()),
        ir_version=10,
    )


def make_inputs(rng, b, t, s, n, d, r=2, pad=None, dtype=np.float32) -> dict[str, np.ndarray]:
    """Random op inputs; U rows RMS-normalised over heads like the real factors; ``pad``: fraction
    of masked keys (None: all real)."""
    factors = lambda length: 0.5 * rng.standard_normal((b, length, 2, 2 * r + 1, n))  # noqa: E731
    qf, kf = factors(t), factors(s)
    for f in (qf, kf):
        u = f[:, :, :, :r]
        u /= np.sqrt(np.mean(u * u, axis=-1, keepdims=True) + 1e-6)
    mask = np.ones((b, s), bool) if pad is None else rng.random((b, s)) >= pad
    return {
        "q": rng.standard_normal((b, t, n, d)).astype(dtype),
        "k": rng.standard_normal((b, s, n, d)).astype(dtype),
        "v": rng.standard_normal((b, s, n, d)).astype(dtype),
        "q_factors": qf.astype(dtype),
        "k_factors": kf.astype(dtype),
        "key_padding_mask": mask,
        "static_mix": (0.3 * rng.standard_normal((2, n, n))).astype(dtype),
    }


def oracle(feeds, scale=0.0, causal=False, window=0, use_static_mix=False, with_probs=False, attn_mask=None):
    """The op contract in float64: L = q k^T scale; pre-compose; mask (``attn_mask`` ANDed in where
    given); softmax; post-compose; P v."""
    f = {k: np.asarray(v, np.float64) if k != "key_padding_mask" else v for k, v in feeds.items()}
    r = (f["q_factors"].shape[3] - 1) // 2

    def side(factors, slot):  # (U, V, g) of one slot in oracles.dcmha.compose's layout
        return factors[:, :, slot, :r], factors[:, :, slot, r : 2 * r], factors[:, :, slot, 2 * r]

    def mix(slot):
        return f["static_mix"][slot] if use_static_mix else None

    lg = logits(f["q"], f["k"], scale or None)
    lg = compose(lg, *side(f["q_factors"], 0), *side(f["k_factors"], 0), mix(0))
    allowed = allowed_mask(f["key_padding_mask"], f["q"].shape[1], causal, window, attn_mask)
    p = compose(masked_softmax(lg, allowed), *side(f["q_factors"], 1), *side(f["k_factors"], 1), mix(1))
    return (apply_probs(p, f["v"]), p, allowed) if with_probs else apply_probs(p, f["v"])


def run(model, feeds, threads=2, native_kernels=True):
    return session(model, native=native_kernels, threads=threads).run(None, feeds)[0]


CASES = {
    # name: (B, T, S, N, d, R, causal, window, static, padding fraction)
    "plain": (2, 33, 33, 4, 16, 2, 0, 0, 0, None),
    "causal": (2, 40, 40, 4, 16, 2, 1, 0, 0, None),
    "causal-long": (1, 150, 150, 3, 8, 2, 1, 0, 0, None),
    "many-chunks": (1, 600, 600, 2, 8, 2, 1, 0, 1, 0.1),  # several key chunks per query block
    "window-many-chunks": (1, 700, 700, 2, 4, 1, 1, 150, 0, None),  # chunks a row cannot see
    "window": (2, 70, 70, 4, 8, 2, 1, 9, 0, None),
    "window-1": (1, 20, 20, 2, 8, 1, 1, 1, 0, None),
    "padded": (3, 29, 29, 4, 8, 2, 0, 0, 0, 0.3),
    "causal-padded-static": (2, 37, 37, 4, 12, 2, 1, 0, 1, 0.25),
    "static": (1, 19, 23, 5, 6, 3, 0, 0, 1, None),
    "decode-T1": (2, 1, 57, 4, 16, 2, 1, 0, 0, 0.2),
    "T1-S1": (1, 1, 1, 2, 4, 2, 1, 0, 0, None),
    "prime-7-13-d5": (3, 7, 13, 3, 5, 2, 0, 0, 1, None),
    "causal-T<S": (2, 13, 29, 4, 5, 2, 1, 0, 0, None),
    "causal-T>S": (2, 31, 11, 4, 8, 2, 1, 0, 0, None),  # rows t < T-S see no key: uniform
    "window-T<S": (1, 17, 50, 3, 7, 2, 1, 6, 1, 0.2),
    "rank0": (1, 9, 9, 3, 4, 0, 1, 0, 0, None),
    "rank5": (1, 21, 21, 6, 4, 5, 0, 0, 1, 0.1),
    "many-heads": (1, 45, 45, 17, 3, 2, 1, 0, 1, None),
    # T <= 8: the direct path (keys read in place, key range split into work items of 256 keys)
    "direct-T2-long": (2, 2, 3000, 4, 16, 2, 1, 0, 1, 0.2),
    "direct-T1-window-long": (1, 1, 2500, 3, 8, 2, 1, 300, 0, None),  # splits no row can see
    "direct-T8-d5": (2, 8, 700, 3, 5, 3, 0, 0, 1, 0.3),
    "direct-T>S": (2, 6, 3, 4, 8, 2, 1, 0, 0, None),  # rows t < T-S see no key: uniform
}


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_float64_contract(case, rng):
    b, t, s, n, d, r, causal, window, static, pad = CASES[case]
    feeds = make_inputs(rng, b, t, s, n, d, r, pad)
    got = run(dcmha_model(causal, window, static), feeds)
    want = oracle(feeds, causal=bool(causal), window=window, use_static_mix=bool(static))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)


def test_fully_masked_rows_are_uniform(rng):
    """A batch row with every key padded: softmax over S entries of NEG is uniform (not NaN)."""
    feeds = make_inputs(rng, 2, 12, 12, 3, 8)
    feeds["key_padding_mask"][1] = False
    got = run(dcmha_model(causal=1), feeds)
    np.testing.assert_allclose(got, oracle(feeds, causal=True), rtol=1e-4, atol=2e-5)
    assert np.isfinite(got).all()


def test_explicit_scale(rng):
    feeds = make_inputs(rng, 1, 10, 14, 2, 8)
    got = run(dcmha_model(scale=0.37), feeds)
    np.testing.assert_allclose(got, oracle(feeds, scale=0.37), rtol=1e-4, atol=2e-5)


def test_masked_probabilities_stay_zero_after_post_compose(rng):
    """Why the kernel may skip keys that no row of a block can see: the mask is shared by the
    heads, so a masked (t,s) has probability 0 in every head, and compose maps the zero head
    vector to zero (every term of a' is linear in a). Rows with no allowed key are the exception
    (uniform) and make the kernel keep every key."""
    feeds = make_inputs(rng, 2, 9, 15, 4, 4, pad=0.3)
    feeds["key_padding_mask"][:, -1] = True  # every row sees at least its last key
    _, p, allowed = oracle(feeds, causal=True, window=5, use_static_mix=True, with_probs=True)
    allowed = np.broadcast_to(allowed, p.shape)
    assert (p[~allowed] == 0.0).all()
    assert (np.abs(p[allowed]) > 0).mean() > 0.99


def test_dynamic_shapes_in_one_session(rng):
    sess = session(dcmha_model(causal=1, use_static_mix=1), threads=2)
    for b, t, s in [(1, 5, 5), (3, 17, 40), (2, 64, 64), (1, 1, 9), (2, 40, 17)]:
        feeds = make_inputs(rng, b, t, s, 4, 8, pad=0.2)
        got = sess.run(None, feeds)[0]
        np.testing.assert_allclose(got, oracle(feeds, causal=True, use_static_mix=True), rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("causal", [0, 1])
def test_threads_give_bit_identical_results(causal, rng):
    feeds = make_inputs(rng, 3, 100, 100, 4, 16, pad=0.1)
    model = dcmha_model(causal=causal, use_static_mix=1)
    one = run(model, feeds, threads=1)
    for threads in (2, 3):
        assert np.array_equal(run(model, feeds, threads=threads), one)


def _op_types_run(model, feeds, native_kernels, tmp_path):
    """Op types of the nodes ORT ran, from its profile."""
    options = session_options(native_kernels=native_kernels, threads=1)
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / ("native" if native_kernels else "body"))
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    out = sess.run(None, feeds)[0]
    with open(sess.end_profiling()) as fh:
        events = json.load(fh)
    return out, {e["args"]["op_name"] for e in events if e.get("cat") == "Node" and "op_name" in e.get("args", {})}


def test_library_kernel_wins_and_body_runs_without_it(rng, tmp_path):
    """With the library, ORT runs the DcmhaAttention kernel; without it, the function body
    (inlined standard ops) runs and gives the same result."""
    feeds = make_inputs(rng, 2, 21, 21, 4, 8, pad=0.2)
    model = dcmha_model(causal=1, window=7, use_static_mix=1)
    want = oracle(feeds, causal=True, window=7, use_static_mix=True)
    fused, fused_ops = _op_types_run(model, feeds, True, tmp_path)
    body, body_ops = _op_types_run(model, feeds, False, tmp_path)
    assert fused_ops == {"DcmhaAttention"}
    assert "DcmhaAttention" not in body_ops and "MatMul" in body_ops and "Softmax" in body_ops
    np.testing.assert_allclose(fused, want, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(body, want, rtol=1e-4, atol=2e-5)


def test_matches_torch_reference_op(rng):
    feeds = make_inputs(rng, 2, 26, 30, 4, 8, pad=0.2)
    got = run(dcmha_model(causal=1, window=11, use_static_mix=1), feeds)
    tensors = [torch.from_numpy(feeds[name]) for name in NAMES]
    want = torch.ops.attn2onnx.dcmha_attention(*tensors, 0.0, True, 11, True).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("t", [24, 1])
@pytest.mark.parametrize("elem", [TensorProto.FLOAT16, TensorProto.BFLOAT16])
def test_half_precision_inputs_accumulate_in_fp32(elem, t, rng):
    """fp16 / bf16 nodes: inputs converted to fp32, computed in fp32, output rounded once."""
    import ml_dtypes  # onnx depends on it

    low = np.float16 if elem == TensorProto.FLOAT16 else ml_dtypes.bfloat16
    feeds = make_inputs(rng, 2, t, 24, 4, 8, pad=0.2)
    feeds = {k: v if v.dtype == bool else v.astype(low).astype(np.float32) for k, v in feeds.items()}
    got = run(dcmha_model(causal=1, use_static_mix=1, elem=elem), feeds)
    want = oracle(feeds, causal=True, use_static_mix=True)
    rounding = float(ml_dtypes.finfo(low).eps)  # one rounding of the output
    np.testing.assert_allclose(got, want, rtol=rounding, atol=rounding * np.abs(want).max())
    exact32 = run(dcmha_model(causal=1, use_static_mix=1), feeds)  # same inputs, fp32 node
    np.testing.assert_array_equal(got, exact32.astype(low).astype(np.float32))


@pytest.mark.parametrize("t", [11, 2])
def test_value_head_dim_may_differ(t, rng):
    feeds = make_inputs(rng, 1, t, 11, 2, 8)
    feeds["v"] = rng.standard_normal((1, 11, 2, 37)).astype(np.float32)
    got = run(dcmha_model(causal=1), feeds)
    np.testing.assert_allclose(got, oracle(feeds, causal=True), rtol=1e-4, atol=2e-5)


def test_bad_inputs_give_clear_errors(rng):
    feeds = make_inputs(rng, 1, 6, 6, 2, 4)
    with pytest.raises(Exception, match="needs window > 0 only with causal = 1"):  # refused before ORT runs it
        run(dcmha_model(causal=0, window=3), feeds)
    bad = dict(feeds, k_factors=feeds["k_factors"][:, :, :, :3])
    with pytest.raises(Exception, match="k_factors must be"):
        run(dcmha_model(), bad)


def test_library_is_cached(library):
    assert native.available()
    assert native.build() == library  # same sources, flags and CPU: no rebuild


# ---------------------------------------------------------------- decode and long contexts
MIB = 1 << 20


def plan(t: int, s: int, n: int, r: int = 2, budget: int = 0) -> dict:
    """The kernel's work plan for a call (attn2onnx_dcmha_plan in kernel.cc): direct path or
    query rows per work item, tiled panel, per-thread scratch bytes; ``budget`` 0: the default."""
    fn = ctypes.CDLL(str(native.library_path())).attn2onnx_dcmha_plan
    fn.restype = None
    fn.argtypes = [ctypes.c_int64] * 5 + [ctypes.POINTER(ctypes.c_int64)]
    out = (ctypes.c_int64 * 4)()
    fn(t, s, n, r, budget, out)
    return {"direct": bool(out[0]), "rows": out[1], "tiled": bool(out[2]), "bytes": out[3]}


@pytest.mark.parametrize("n", [8, 32])
def test_scratch_per_thread_stays_under_the_budget_at_any_length(n):
    """Issue 12: the per-thread panel grew with S (about 128 MiB at S=32K, N=32). The plan now
    bounds it by the 20 MiB default budget, and at S <= 4096 keeps the full panel with at least
    half the widest query block, in whole micro-tiles (8 rows with AVX-512, 6 otherwise; the
    widest block is 8 of them), whatever the vector width: a block cut to 31 rows (AVX-512's
    16-float row padding at N=32, S=4096 under a 16 MiB budget) lost the register blocking."""
    widest = plan(4096, 64, n, budget=1 << 40)["rows"]
    for s in (512, 4096):
        chosen = plan(4096, s, n)
        assert not chosen["tiled"] and chosen["rows"] >= widest // 2 and chosen["rows"] % (widest // 8) == 0
        assert chosen["bytes"] <= 20 * MIB
    for s in (32768, 40000, 1 << 20):
        chosen = plan(4096, s, n)
        assert chosen["bytes"] <= 20 * MIB, (s, chosen)
    assert plan(1, 32768, 32)["direct"] and plan(1, 32768, 32)["bytes"] <= MIB  # decode: no panel per thread


def _budget_giving(kind: str, t: int, s: int, n: int, r: int) -> int:
    """The largest budget (of a geometric ladder) whose plan is of ``kind``."""
    checks = {
        "fewer-rows": lambda p: not p["tiled"] and p["rows"] < plan(t, s, n, r, 1 << 40)["rows"],
        "tiled": lambda p: p["tiled"] and p["rows"] > 1,
        "tiled-one-row": lambda p: p["tiled"] and p["rows"] == 1,
    }
    for step in range(80):
        budget = int(2 ** (24 - step / 4))
        if checks[kind](plan(t, s, n, r, budget)):
            return budget
    raise AssertionError(f"no budget gives a {kind} plan")


@pytest.mark.parametrize("kind", ["fewer-rows", "tiled", "tiled-one-row"])
def test_bounded_scratch_plans_match_contract(kind, rng, monkeypatch):
    """Smaller query blocks and the tiled (recomputed) panel, forced at a small S by lowering the
    budget through ATTN2ONNX_DCMHA_SCRATCH_BYTES (read when a session creates the kernel)."""
    b, t, s, n, d, r = 2, 300, 300, 3, 8, 2
    budget = _budget_giving(kind, t, s, n, r)
    assert plan(t, s, n, r, budget)["bytes"] <= budget
    monkeypatch.setenv("ATTN2ONNX_DCMHA_SCRATCH_BYTES", str(budget))
    feeds = make_inputs(rng, b, t, s, n, d, r, pad=0.1)
    model = dcmha_model(causal=1, window=170, use_static_mix=1)
    one = run(model, feeds, threads=1)
    np.testing.assert_allclose(one, oracle(feeds, causal=True, window=170, use_static_mix=True), rtol=1e-4, atol=2e-5)
    assert np.array_equal(run(model, feeds, threads=3), one)


@pytest.mark.parametrize("t", [1, 2])
def test_decode_at_long_context_matches_body(t, rng):
    """A decode step (T=1, 2 against 4000 cached keys, causal aligned to the end): the direct path
    equals the function body, and any thread count gives the same bits (fixed key splits)."""
    feeds = make_inputs(rng, 2, t, 4000, 4, 16, pad=0.1)
    model = dcmha_model(causal=1, use_static_mix=1)
    one = run(model, feeds, threads=1)
    np.testing.assert_allclose(one, run(model, feeds, native_kernels=False), rtol=1e-4, atol=2e-5)
    for threads in (2, 3):
        assert np.array_equal(run(model, feeds, threads=threads), one)
