"""DcmhaAttention's blocked CPU kernel at its tile boundaries (issue 25).

The kernel cuts the work into query blocks of up to 64 rows (8 register micro-tiles of 8 rows
with AVX-512, 6 rows otherwise), key chunks of 4 micro-tile widths (128 keys with AVX-512, 64
otherwise), vector groups of 16 (8) keys, direct-path key splits of 256 keys for T <= 8, and skips
key chunks no row of a block may see (causal, window, padding, attn_mask). Each case sits one
below, at, or one above such a size on some axis (T, S, window, padded run, mask edge), or
straddles two, and is checked against the float64 contract (tests/test_native_kernels.oracle)
and for bit-identical results on 1, 2, 3 and 4 threads (work items are fixed by the shapes, each
row is computed in one fixed order).
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from test_native_kernels import dcmha_model, library, make_inputs, oracle, run  # noqa: F401  (library: fixture)

ATOL, RTOL = 2e-5, 1e-4

# name: (B, T, S, N, d, R, causal, window, static, padding)
# padding: None (all real), a fraction (random), or ("run", start, stop): keys [start, stop) padded.
CASES = {
    # query blocks (64 rows) and micro-tiles (8 / 6 rows)
    "T63": (1, 63, 63, 2, 8, 2, 1, 0, 0, None),
    "T64": (1, 64, 64, 2, 8, 2, 1, 0, 0, None),
    "T65": (1, 65, 65, 2, 8, 2, 1, 0, 0, None),
    "T129-nc": (2, 129, 129, 3, 5, 1, 0, 0, 1, 0.1),
    "T127-S130": (1, 127, 130, 2, 7, 2, 1, 0, 1, None),
    # key chunks (128 / 64 keys) and micro-tile columns (32 / 16)
    "S127": (1, 20, 127, 2, 8, 2, 0, 0, 0, None),
    "S128": (1, 20, 128, 2, 8, 2, 0, 0, 0, None),
    "S129": (1, 20, 129, 2, 8, 2, 0, 0, 0, None),
    "S31": (2, 17, 31, 3, 4, 2, 0, 0, 1, None),
    "S33": (2, 17, 33, 3, 4, 2, 0, 0, 1, None),
    "S257-causal": (1, 40, 257, 2, 8, 2, 1, 0, 0, 0.05),
    "T>S-65-63": (1, 65, 63, 2, 8, 2, 1, 0, 0, None),  # rows t < 2 see no key: uniform
    # the direct path (T <= 8) against the blocked one (T = 9), key splits of 256
    "direct-T8-S256": (2, 8, 256, 2, 8, 2, 1, 0, 0, None),
    "direct-T8-S257": (2, 8, 257, 2, 8, 2, 1, 0, 1, 0.2),
    "blocked-T9-S257": (2, 9, 257, 2, 8, 2, 1, 0, 1, 0.2),
    "direct-T1-S513": (1, 1, 513, 3, 8, 1, 1, 0, 0, None),
    # windows whose edge falls on, before and after chunk / group edges
    "window-128": (1, 300, 300, 2, 4, 2, 1, 128, 0, None),
    "window-129": (1, 300, 300, 2, 4, 2, 1, 129, 0, None),
    "window-16": (1, 150, 150, 2, 4, 2, 1, 16, 1, None),
    "window-33-T<S": (1, 70, 200, 2, 4, 2, 1, 33, 0, 0.1),
    "window-1": (1, 70, 70, 2, 4, 1, 1, 1, 0, None),
    # padded runs: whole chunks, leading keys (the trimmed range starts off a tile edge), trailing
    "pad-chunk": (1, 80, 300, 2, 4, 2, 0, 0, 0, ("run", 128, 256)),
    "pad-leading-37": (2, 70, 160, 2, 4, 2, 0, 0, 1, ("run", 0, 37)),
    "pad-trailing-from-129": (1, 70, 260, 2, 4, 2, 0, 0, 0, ("run", 129, 260)),
    "pad-all-but-one": (1, 66, 130, 2, 4, 2, 0, 0, 0, ("run", 1, 130)),
    "pad-all-causal": (1, 65, 65, 2, 4, 2, 1, 0, 0, ("run", 0, 65)),  # every row uniform
    # other sizes the micro-kernels tile: R, N, d, dv
    "R0-N1": (1, 70, 70, 1, 16, 0, 1, 0, 0, None),
    "R3-N5-d3": (1, 66, 66, 5, 3, 3, 0, 0, 1, 0.2),
}


def feeds_for(rng, case):
    b, t, s, n, d, r, _, _, _, pad = CASES[case]
    feeds = make_inputs(rng, b, t, s, n, d, r, pad if isinstance(pad, float) else None)
    if isinstance(pad, tuple):
        feeds["key_padding_mask"][:, pad[1] : pad[2]] = False
    return feeds


def check(model, feeds, want):
    """Parity with the float64 contract on one thread, the same bits on 2, 3 and 4."""
    one = run(model, feeds, threads=1)
    np.testing.assert_allclose(one, want, rtol=RTOL, atol=ATOL)
    assert np.isfinite(one).all()
    for threads in (2, 3, 4):
        assert np.array_equal(run(model, feeds, threads=threads), one), threads


@pytest.mark.parametrize("case", list(CASES))
def test_tile_boundaries_match_contract_on_every_thread_count(case, rng):
    _, _, _, _, _, _, causal, window, static, _ = CASES[case]
    feeds = feeds_for(rng, case)
    want = oracle(feeds, causal=bool(causal), window=window, use_static_mix=bool(static))
    check(dcmha_model(causal, window, static), feeds, want)


def test_value_head_dim_off_the_tile_width(rng):
    """dv = 37: the P v micro-kernel's last column tile is partial (32 + 5 with AVX-512)."""
    feeds = make_inputs(rng, 1, 70, 140, 2, 8)
    feeds["v"] = rng.standard_normal((1, 140, 2, 37)).astype(np.float32)
    check(dcmha_model(causal=1), feeds, oracle(feeds, causal=True))


def with_attn_mask(model, shape):
    """``model`` with the optional 8th input attn_mask (bool, ``shape`` of dim names / sizes)."""
    model.graph.input.append(helper.make_tensor_value_info("attn_mask", TensorProto.BOOL, shape))
    model.graph.node[-1].input.append("attn_mask")
    return model


@pytest.mark.parametrize(
    "form, t, s",
    [
        ("TS-band", 70, 200),  # [T,S]: each row sees a band that starts and ends off the chunk edges
        ("BNTS-head-blind", 65, 130),  # [B,N,T,S]: one head of some rows sees no key (uniform there)
        ("B11S-chunk", 66, 260),  # [B,1,1,S]: the second chunk masked for every row
    ],
)
def test_attn_mask_edges_match_contract_on_every_thread_count(form, t, s, rng):
    b, n = 2, 3
    feeds = make_inputs(rng, b, t, s, n, 4, pad=0.1)
    if form == "TS-band":
        rows, cols = np.arange(t)[:, None], np.arange(s)[None, :]
        mask = (cols >= rows + 3) & (cols < rows + 131)
        shape = ["T", "S"]
    elif form == "BNTS-head-blind":
        mask = rng.random((b, n, t, s)) > 0.3
        mask[0, 1, 5:9] = False
        shape = ["B", n, "T", "S"]
    else:
        mask = np.ones((b, 1, 1, s), bool)
        mask[:, :, :, 128:256] = False
        shape = ["B", 1, 1, "S"]
    feeds["attn_mask"] = mask
    want = oracle({k: v for k, v in feeds.items() if k != "attn_mask"}, causal=True, attn_mask=mask)
    check(with_attn_mask(dcmha_model(causal=1), shape), feeds, want)
