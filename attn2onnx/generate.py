"""Token generation with a decode graph (``attn2onnx export --decode``) in ONNX Runtime.

:class:`DecodeSession` runs the graph's prefill and decode steps with the caches kept as ORT
values: each step's ``present.*`` outputs are bound, as they are, to the next step's
``past_key_values.*`` inputs (IO binding), so no cache goes through numpy between steps; only
the last row of logits is read back. :func:`generate` is the loop: prefill once, then one step
per token, greedy or sampled (temperature, top-k, seed), until EOS or ``max_new_tokens``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .errors import UsageError


@dataclass
class GenerateResult:
    """What :func:`generate` made: the new tokens and how long it took (prefill apart)."""

    prompt_ids: list[int]
    tokens: list[int] = field(default_factory=list)
    stopped: str = "max_new_tokens"  # or "eos"
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: tokens after the first (each one decode step) per second of decoding."""
        steps = max(len(self.tokens) - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds > 0 else 0.0


class DecodeSession:
    """An ONNX Runtime session of a decode graph and the caches of the sequences it runs.

    ``prefill(ids, mask, positions)`` starts from an empty cache; ``step(ids, mask, positions)``
    continues it (``mask`` covers every past and new position). Both return the logits [B,T,V]
    of the new positions."""

    def __init__(self, path: str, threads: int | None = None) -> None:
        import onnxruntime as ort

        from .models.decode import read_decode_metadata
        from .onnx_io import load_onnx
        from .runtime import session

        self.meta = read_decode_metadata(load_onnx(path), path)
        self.session = session(path, threads=threads)
        self._ort = ort
        self.past: list[Any] = []
        self.length = 0  # positions cached so far (the longest cache's past)

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def max_len(self) -> int:
        return int(self.meta["max_len"])

    def _empty_past(self, batch: int) -> list[Any]:
        float_type = {i.name: i.type for i in self.session.get_inputs()}
        dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
        past = []
        for cache in self.meta["caches"]:
            shape = [batch if d == "batch" else 0 if isinstance(d, str) else d for d in cache["dims"]]
            zeros = np.zeros(shape, dtype=dtypes[float_type[cache["input"]]])
            past.append(self._ort.OrtValue.ortvalue_from_numpy(zeros))
        return past

    def _run(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: list[Any]) -> np.ndarray:
        binding = self.session.io_binding()
        for name, value in zip(("input_ids", "attention_mask", "position_ids"), (ids, mask, positions)):
            binding.bind_cpu_input(name, np.ascontiguousarray(value, dtype=np.int64))
        for cache, value in zip(self.meta["caches"], past):
            binding.bind_ortvalue_input(cache["input"], value)
        binding.bind_output("logits", "cpu")
        for cache in self.meta["caches"]:
            binding.bind_output(cache["output"], "cpu")
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        self.past = list(outputs[1:])
        self.length += ids.shape[1]
        return outputs[0].numpy()

    def prefill(
        self, ids: np.ndarray, mask: np.ndarray | None = None, positions: np.ndarray | None = None
    ) -> np.ndarray:
        """Run the prompt ids [B,T] from an empty cache (mask: 1 = real token, default all;
        positions: default 0..T-1)."""
        self.length = 0
        return self.step(ids, mask, positions, self._empty_past(ids.shape[0]))

    def step(
        self,
        ids: np.ndarray,
        mask: np.ndarray | None = None,
        positions: np.ndarray | None = None,
        past: list[Any] | None = None,
    ) -> np.ndarray:
        """Run new ids [B,T] after the cached positions (mask [B, cached + T], default all real;
        positions: default the next T indices)."""
        batch, seq = ids.shape
        if mask is None:
            mask = np.ones((batch, self.length + seq), dtype=np.int64)
        if positions is None:
            positions = np.broadcast_to(np.arange(self.length, self.length + seq), (batch, seq))
        return self._run(ids, mask, positions, self.past if past is None else past)


def pick_token(logits: np.ndarray, temperature: float, top_k: int, rng: np.random.Generator) -> int:
    """The next token from one row of logits [V]: argmax at temperature 0, else a draw from
    softmax(logits / temperature) over the top_k largest (all when top_k is 0)."""
    if temperature == 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / temperature
    if 0 < top_k < scaled.size:
        cutoff = np.partition(scaled, -top_k)[-top_k]
        scaled = np.where(scaled >= cutoff, scaled, -np.inf)
    probs = np.exp(scaled - scaled.max())
    return int(rng.choice(scaled.size, p=probs / probs.sum()))


def check_request(session: DecodeSession, prompt_ids: Sequence[int], max_new_tokens: int) -> None:
    """One-line errors for a prompt the model cannot take: empty, ids outside the vocabulary,
    or longer, with the new tokens, than the model's max_len."""
    if not prompt_ids:
        raise UsageError("the prompt is empty")
    bad = [i for i in prompt_ids if not 0 <= i < session.vocab_size]
    if bad:
        raise UsageError(f"prompt id {bad[0]} is outside the model's vocabulary [0, {session.vocab_size})")
    # The last new token is never fed back: positions run to len(prompt) + max_new_tokens - 2.
    if len(prompt_ids) + max_new_tokens - 1 > session.max_len:
        raise UsageError(
            f"{len(prompt_ids)} prompt tokens + {max_new_tokens} new ones exceed the model's max_len "
            f"{session.max_len}; lower --max-new-tokens or shorten the prompt"
        )


def generate(
    session: DecodeSession,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
    eos_id: int | None = None,
    on_token: Callable[[int], None] | None = None,
) -> GenerateResult:
    """Prefill ``prompt_ids`` once, then one decode step per new token until ``eos_id`` (kept
    as the last token) or ``max_new_tokens``; ``on_token`` sees each token as it comes."""
    check_request(session, prompt_ids, max_new_tokens)
    if temperature < 0 or top_k < 0:
        raise UsageError(f"temperature and top_k must be >= 0, got {temperature} and {top_k}")
    rng = np.random.default_rng(seed)
    result = GenerateResult(list(prompt_ids))
    start = time.perf_counter()
    logits = session.prefill(np.asarray([prompt_ids], dtype=np.int64))[0, -1]
    result.prefill_seconds = time.perf_counter() - start
    start = time.perf_counter()
    while True:
        token = pick_token(logits, temperature, top_k, rng)
        result.tokens.append(token)
        if on_token is not None:
            on_token(token)
        if token == eos_id:
            result.stopped = "eos"
            break
        if len(result.tokens) == max_new_tokens:
            break
        logits = session.step(np.asarray([[token]], dtype=np.int64))[0, -1]
    result.decode_seconds = time.perf_counter() - start
    return result


__all__ = ["DecodeSession", "GenerateResult", "check_request", "generate", "pick_token"]
