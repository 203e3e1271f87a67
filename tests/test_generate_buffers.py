"""DecodeSession writes each step's caches into two reusable buffers per cache (ping-pong) and
still computes what a plain ``session.run`` of the same graph computes, ORT allocating.

Each model (mha; dcmha with a local window on layer 0, so a window cache grows, then is capped)
is exported with ``--decode`` and optimised for ORT, as ``attn2onnx generate`` runs it. The
prompt is short and the steps many, so both buffers of a cache grow during the loop."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

import attn2onnx
from attn2onnx.generate import DecodeSession
from attn2onnx.models.decode import export_decode

WINDOW = 6  # dcmha layer 0: its caches keep 5 positions
PROMPT, STEPS, BATCH, VOCAB = 3, 10, 2, 64  # buffers start at twice the prompt: the steps outgrow them
TOTAL = PROMPT + STEPS
RTOL, ATOL = 1e-6, 1e-6


@pytest.fixture(scope="module", params=["mha", "dcmha"])
def graph(request, tmp_path_factory) -> str:
    """A tiny LM's decode graph after ``optimize --target ort``."""
    window = {"options": {"rope": True, "qk_norm": True}, "layer_options": [{"window": WINDOW}, {}]}
    config = attn2onnx.ModelConfig(
        family="lm",
        variant=request.param,
        layers=2,
        d_model=32,
        heads=4,
        max_len=32,
        vocab_size=VOCAB,
        **(window if request.param == "dcmha" else {}),
    )
    folder = tmp_path_factory.mktemp(request.param)
    export_decode(attn2onnx.build_model(config).eval(), folder / "lm.decode.onnx")
    attn2onnx.optimize(str(folder / "lm.decode.onnx"), str(folder / "lm.opt.onnx"), target="ort")
    return str(folder / "lm.opt.onnx")


def left_padded(batch: int = BATCH) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids, mask and positions [batch, TOTAL] of left-padded rows (row r starts r positions late)."""
    ids = np.random.default_rng(0).integers(0, VOCAB, (batch, TOTAL))
    mask = np.ones((batch, TOTAL), dtype=np.int64)
    for row in range(batch):
        mask[row, :row] = 0
    return ids, mask, np.ascontiguousarray(np.broadcast_to(np.arange(TOTAL), (batch, TOTAL)))


def caches(session: DecodeSession, batch: int, past: int, rng: np.random.Generator | None = None) -> list[np.ndarray]:
    """Caches of ``past`` positions (every cache, window ones too, as benchmarks/generate.py
    makes them): zeros, or random values from ``rng``."""
    shapes = [
        [batch if d == "batch" else past if isinstance(d, str) else d for d in c.dims] for c in session.meta.caches
    ]
    return [np.zeros(s, np.float32) if rng is None else rng.random(s, dtype=np.float32) for s in shapes]


def plain_step(session: DecodeSession, past: list[np.ndarray], ids, mask, positions) -> list[np.ndarray]:
    """[logits, *present] of one ``session.run`` (ORT allocates the outputs)."""
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    feeds.update((c.input, value) for c, value in zip(session.meta.caches, past))
    return session.session.run(None, {name: np.ascontiguousarray(value) for name, value in feeds.items()})


def slices(t: int) -> tuple[slice, slice]:
    """The new positions and the mask's span of run ``t`` (0: the prefill)."""
    start = 0 if t == 0 else PROMPT + t - 1
    stop = PROMPT if t == 0 else start + 1
    return slice(start, stop), slice(0, stop)


def plain_loop(session: DecodeSession) -> list[list[np.ndarray]]:
    """[logits, *present] of the prefill and every step, numpy caches carried between runs."""
    ids, mask, positions = left_padded()
    past, runs = caches(session, BATCH, 0), []
    for t in range(STEPS + 1):
        new, seen = slices(t)
        runs.append(plain_step(session, past, ids[:, new], mask[:, seen], positions[:, new]))
        past = runs[-1][1:]
    return runs


def session_run(session: DecodeSession, t: int) -> list[np.ndarray]:
    """[logits, *present] (copied out of the session's buffers) of DecodeSession's run ``t``."""
    ids, mask, positions = left_padded()
    new, seen = slices(t)
    run = session.prefill if t == 0 else session.step
    logits = run(ids[:, new], mask[:, seen], positions[:, new])
    return [logits, *(np.array(value.numpy(), copy=True) for value in session.past)]


def assert_runs_equal(got: list[list[np.ndarray]], want: list[list[np.ndarray]]) -> None:
    assert len(got) == len(want)
    for t, (got_run, want_run) in enumerate(zip(got, want)):
        for name, a, b in zip(("logits", *range(len(got_run) - 1)), got_run, want_run):
            assert a.shape == b.shape, (t, name)
            np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=f"run {t}, output {name}")


def test_logits_and_presents_equal_the_plain_run(graph) -> None:
    """Left-padded batch 2, prefill + STEPS steps, across both buffers' growth (and, dcmha,
    a window cache reaching its cap): every logit and present as ORT's own allocation gives."""
    session = DecodeSession(graph)
    assert_runs_equal([session_run(session, t) for t in range(STEPS + 1)], plain_loop(session))


def buffer_of(session: DecodeSession, cache: int, value: ort.OrtValue) -> int | None:
    """Which of the cache's two buffers holds all of ``value``'s bytes (None: neither)."""
    start, nbytes = value.data_ptr(), value.numpy().nbytes
    for index, flat in enumerate(session._buffers[cache].flats):
        if flat.ctypes.data <= start and start + nbytes <= flat.ctypes.data + flat.nbytes:
            return index
    return None


def test_presents_alternate_between_the_two_buffers(graph) -> None:
    """Every present lies in one of its cache's buffers; consecutive runs take turns, so no
    step writes into the buffer its past is read from; the buffers grow (not max_len up front)."""
    session = DecodeSession(graph)
    held: list[int | None] = [None] * len(session.meta.caches)
    sizes = []
    for t in range(STEPS + 1):
        session_run(session, t)
        for cache, value in enumerate(session.past):
            index = buffer_of(session, cache, value)
            assert index is not None, f"run {t}: present {cache} is not in the session's buffers"
            assert index != held[cache], f"run {t}: present {cache} written into its past's buffer"
            held[cache] = index
        sizes.append([[flat.size for flat in buffers.flats] for buffers in session._buffers])
    for i, cache in enumerate(session.meta.caches):
        if cache.limit is None:  # a window cache's buffers stop at its window
            first, last = sizes[1][i], sizes[-1][i]
            assert all(b > a for a, b in zip(first, last)), f"cache {i}: buffers never grew ({first} -> {last})"
            per_position = session.past[i].numpy().size // TOTAL
            assert max(last) < per_position * session.max_len, f"cache {i}: max_len positions allocated"


def test_assigned_past_steps_as_the_plain_run(graph) -> None:
    """As benchmarks/generate.py does: caches made elsewhere (of a batch the session's buffers
    are not for; window caches longer than their window) assigned to ``past`` and ``length``,
    then default-mask steps: the logits of the plain run from the same caches."""
    session = DecodeSession(graph)
    session.prefill(np.arange(PROMPT, dtype=np.int64)[None])  # buffers for batch 1
    context, rng = WINDOW + 1, np.random.default_rng(1)
    past = caches(session, BATCH, context, rng)
    session.past, session.length = [ort.OrtValue.ortvalue_from_numpy(value) for value in past], context
    ids = rng.integers(0, VOCAB, (BATCH, 3))
    for t in range(ids.shape[1]):
        length = context + t
        want = plain_step(session, past, ids[:, t : t + 1], np.ones((BATCH, length + 1), np.int64), [[length]] * BATCH)
        np.testing.assert_allclose(session.step(ids[:, t : t + 1]), want[0], rtol=RTOL, atol=ATOL)
        past = want[1:]
