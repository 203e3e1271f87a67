"""dcmha's decode caches are token-major ([batch, past, ...]), the layout DcmhaAttention reads in
place: a decode step extends each cache with one Concat (a window layer then keeps its last
positions with one Slice) and copies it nowhere else -- no Transpose to or from Optimum's
head-major layout around the kernel. The graph computes what PyTorch computes: row by row against
the full forward with left padding and across a local-window boundary, as exported and after
``optimize --target ort``, and each step's present caches equal the eager decode step's."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import attn2onnx
from attn2onnx.generate import DecodeSession
from attn2onnx.models.decode import DecodeLM, export_decode
from attn2onnx.passes import optimize
from attn2onnx.validate import compare_decode, decode_cases

WINDOW = 4  # layer 0: 4 keys, its cache keeps 3 positions; layer 1 global
STEPS = 5


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    config = attn2onnx.ModelConfig(
        family="lm",
        variant="dcmha",
        layers=2,
        d_model=32,
        heads=4,
        max_len=64,
        options={"rope": True, "qk_norm": True},
        layer_options=[{"window": WINDOW}, {}],
    )
    return attn2onnx.build_model(config).eval()


@pytest.fixture(scope="module")
def graphs(model, tmp_path_factory) -> dict[str, str]:
    """The decode graph as exported and after optimize --target ort."""
    folder = tmp_path_factory.mktemp("dcmha_cache_layout")
    export_decode(model, folder / "lm.onnx")
    optimize(folder / "lm.onnx", folder / "lm.opt.onnx", target="ort")
    return {"exported": str(folder / "lm.onnx"), "optimised": str(folder / "lm.opt.onnx")}


def cache_path(graph: onnx.GraphProto, name: str) -> list[str]:
    """The op types from cache input ``name`` down to the node that makes its present output, in
    order, following the single reader of each value that copies it (not the kernel, not Shape)."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for value in node.input:
            readers.setdefault(value, []).append(node)
    outputs = {o.name for o in graph.output}
    present = name.replace("past_key_values.", "present.")
    path, value = [], name
    while value != present:
        copies = [n for n in readers.get(value, []) if n.op_type not in ("DcmhaAttention", "Shape")]
        assert len(copies) == 1, f"{value}: readers {[n.op_type for n in readers.get(value, [])]}"
        path.append(copies[0].op_type)
        value = copies[0].output[0]
        assert len(path) < 4 or value in outputs, f"{name}: {path}"
    return path


@pytest.mark.parametrize("which", ["exported", "optimised"])
def test_each_cache_is_extended_by_one_concat_and_read_in_place(graphs, which) -> None:
    graph = onnx.load(graphs[which]).graph
    caches = [i.name for i in graph.input if i.name.startswith("past_key_values.")]
    assert len(caches) == 6
    for name in caches:
        want = ["Concat", "Slice"] if name.startswith("past_key_values.0.") else ["Concat"]
        assert cache_path(graph, name) == want, name
    assert not [n for n in graph.node if n.op_type == "Transpose"]
    kernels = [n for n in graph.node if n.op_type == "DcmhaAttention"]
    concat_of = {n.output[0]: n for n in graph.node if n.op_type == "Concat"}
    for node in kernels:  # k, v and k_factors: the Concat outputs themselves
        assert all(concat_of[node.input[i]].input[0].startswith("past_key_values.") for i in (1, 2, 4))


@pytest.mark.parametrize("which", ["exported", "optimised"])
def test_decode_matches_full_forward_row_by_row(model, graphs, which) -> None:
    """Left-padded batches and prompts ending just before and after the window (decode_cases)."""
    path = graphs[which]
    cases = decode_cases(DecodeSession(path).meta, steps=STEPS)
    assert (3, WINDOW - 2) in cases and (3, WINDOW) in cases  # the cache limit (3) - 1 and + 1
    results = compare_decode(path, model, cases, steps=STEPS)
    assert all(r.passed for r in results), results
    assert max(r.max_abs_err for r in results) < 1e-5


def test_present_caches_equal_the_eager_step(model, graphs) -> None:
    """Prefill then decode steps past the window: every present cache, token-major, as PyTorch's."""
    session, wrapper = DecodeSession(graphs["optimised"]), DecodeLM(model)
    ids = np.random.default_rng(0).integers(0, 256, (2, 6))
    mask = np.ones((2, 6), dtype=np.int64)
    mask[1, :2] = 0  # row 1 left-padded
    positions = np.broadcast_to(np.arange(6), (2, 6))
    past = wrapper.empty_past(2)
    prompt = 3
    with torch.inference_mode():
        for start, stop in ((0, prompt), *((t, t + 1) for t in range(prompt, 6))):
            feed = (ids[:, start:stop], mask[:, :stop], positions[:, start:stop])
            if start == 0:
                session.prefill(*feed)
            else:
                session.step(*feed)
            past = wrapper(*(torch.from_numpy(np.ascontiguousarray(x)) for x in feed), *past)[1:]
            for got, want in zip(session.past, past):
                assert got.shape() == list(want.shape)
                np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
