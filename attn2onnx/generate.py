"""Token generation with a decode graph (``attn2onnx export --decode``) in ONNX Runtime.

:class:`DecodeSession` runs the graph's prefill and decode steps with the caches kept as ORT
values: each step writes its ``present.*`` outputs into buffers it reuses (two per cache,
taken in turn) and binds the previous step's, as they are, to its ``past_key_values.*`` inputs
(IO binding), so no cache goes through numpy between steps; only the last row of logits is read
back. A graph with shared KV buffers (``export --decode --shared-kv``, metadata ``"cache":
"shared"``) gets one buffer per cache instead, bound as both its past and its present and
written in place (:class:`_SharedBuffer`). :func:`generate` is the loop: prefill once, then one
step per token, greedy or sampled (temperature, top-k, seed), until EOS or ``max_new_tokens``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from .errors import UsageError

if TYPE_CHECKING:
    from .graph_format import CacheSpec


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


class _PingPong:
    """Two flat buffers of one cache: each step reads its past from one and writes its present
    into the other, so the caches of a decode loop live in memory mapped once.

    ORT cannot reuse a freed present for the next one (each is one position longer), so letting
    it allocate the presents maps fresh memory every step, which dominates at large caches
    (benchmarks/RESULTS.md "Decode" times the steps with these buffers). A buffer grows
    geometrically (twice the positions the step needs, at most max_len) when a step needs more,
    so max_len (possibly huge) is never allocated up front."""

    def __init__(self, spec: CacheSpec, dtype: type, batch: int, max_len: int) -> None:
        self.spec, self.dtype, self.batch, self.max_len = spec, dtype, batch, max_len
        self.axis = next(i for i, d in enumerate(spec.dims) if isinstance(d, str) and d != "batch")  # past dim
        self.flats: list[np.ndarray] = [np.empty(0, dtype), np.empty(0, dtype)]

    def holding(self, address: int) -> int | None:
        """Index of the buffer that ``address`` points into, None for neither."""
        for index, flat in enumerate(self.flats):
            start = flat.ctypes.data
            if flat.size and start <= address < start + flat.nbytes:
                return index
        return None

    def present(self, past: Any, seq: int) -> np.ndarray:
        """A view of the exact shape of the present after ``past`` (an OrtValue) and ``seq`` new
        positions (a window cache keeps min(past + seq, limit)), in the buffer ``past`` is not in."""
        positions = past.shape()[self.axis] + seq
        shape = self.spec.shape(self.batch, positions)
        target = 1 if self.holding(past.data_ptr()) == 0 else 0
        size = int(np.prod(shape))
        if self.flats[target].size < size:
            capacity = min(2 * positions, max(self.max_len, positions))
            self.flats[target] = np.empty(int(np.prod(self.spec.shape(self.batch, capacity))), self.dtype)
        return self.flats[target][:size].reshape(shape)


class _SharedBuffer:
    """One cache of a shared-buffer graph: a [.., capacity, ..] array bound as both the past
    input and the present output, which the graph writes the new rows into in place.

    It grows as :class:`_PingPong` does (twice the positions a step needs, at most max_len),
    copying the valid positions over once per growth; ``capacity`` fixes its size up front."""

    def __init__(self, spec: CacheSpec, dtype: type, batch: int, max_len: int, capacity: int | None) -> None:
        import onnxruntime as ort

        self.spec, self.dtype, self.batch, self.max_len, self._ort = spec, dtype, batch, max_len, ort
        self.axis = next(i for i, d in enumerate(spec.dims) if isinstance(d, str) and d != "batch")
        self.array = np.zeros(spec.shape(batch, capacity or 0), dtype)
        self.value = ort.OrtValue.ortvalue_from_numpy(self.array)

    def reserve(self, positions: int, keep: int) -> None:
        """Room for ``positions`` positions, the first ``keep`` kept."""
        if self.array.shape[self.axis] >= positions:
            return
        capacity = min(2 * positions, max(self.max_len, positions))
        array = np.zeros(self.spec.shape(self.batch, capacity), self.dtype)
        index = (slice(None),) * self.axis + (slice(0, keep),)
        array[index] = self.array[index]
        self.array, self.value = array, self._ort.OrtValue.ortvalue_from_numpy(array)

    def load(self, past: Any, length: int) -> None:
        """Copy the first ``length`` positions of ``past`` (an OrtValue or array, a cache from
        elsewhere: growing-layout or another buffer) into this buffer."""
        values = past.numpy() if hasattr(past, "numpy") else np.asarray(past)
        index = (slice(None),) * self.axis + (slice(0, length),)
        self.array[index] = values[index]

    def valid(self, length: int) -> np.ndarray:
        """A view of the first ``length`` positions."""
        return self.array[(slice(None),) * self.axis + (slice(0, length),)]


class DecodeSession:
    """An ONNX Runtime session of a decode graph and the caches of the sequences it runs.

    ``prefill(ids, mask, positions)`` starts from an empty cache; ``step(ids, mask, positions)``
    continues it (``mask`` covers every past and new position). Both return the logits [B,T,V]
    of the new positions.

    ``past`` holds the last step's presents: views into two buffers per cache that the steps
    take in turn (:class:`_PingPong`), so a present is overwritten two steps later (copy it to
    keep it). ``past`` (and ``length``) may be assigned: caches from elsewhere are read as they
    are, and the step writes into the session's buffers.

    With a shared-buffer graph (``meta.shared``) ``past`` holds one buffer per cache, of
    ``capacity`` positions (default: grown as needed, up to max_len), whose first ``length``
    are valid; an assigned ``past`` (caches of ``length`` positions in any buffer) is copied in
    before the step. :meth:`caches` reads the valid positions in either form."""

    def __init__(self, path: str, threads: int | None = None, capacity: int | None = None) -> None:
        import onnxruntime as ort

        from .onnx_io import load_onnx
        from .runtime import session
        from .runtime.metadata import require_decode

        self.path = str(path)
        self.meta = require_decode(load_onnx(path), self.path)
        self.session = session(path, threads=threads)
        self._ort = ort
        self.past: list[Any] = []
        self.length = 0  # positions cached so far (the longest cache's past)
        self._specs = self.meta.caches
        types = {i.name: i.type for i in self.session.get_inputs()}
        dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
        self._dtypes = [dtypes[types[spec.input]] for spec in self._specs]
        self._buffers: list[_PingPong] = []
        self.capacity = capacity
        self._shared: list[_SharedBuffer] = []

    @property
    def vocab_size(self) -> int:
        return self.meta.vocab_size

    @property
    def max_len(self) -> int:
        return self.meta.max_len

    def _empty_past(self, batch: int) -> list[Any]:
        return [
            self._ort.OrtValue.ortvalue_from_numpy(np.zeros(spec.shape(batch, 0), dtype))
            for spec, dtype in zip(self._specs, self._dtypes)
        ]

    def _buffers_for(self, batch: int) -> list[_PingPong]:
        """The caches' buffers for ``batch`` sequences: new (empty) ones when the batch changed."""
        if not self._buffers or self._buffers[0].batch != batch:
            self._buffers = [
                _PingPong(spec, dtype, batch, self.max_len) for spec, dtype in zip(self._specs, self._dtypes)
            ]
        return self._buffers

    def caches(self) -> list[np.ndarray]:
        """The valid positions of every cache (copies), in the growing graph's layout either way."""
        if self.meta.shared:
            return [buffer.valid(self.length).copy() for buffer in self._shared]
        return [np.array(value.numpy(), copy=True) for value in self.past]

    def _bind_shared(self, binding: Any, batch: int, seq: int, past: list[Any]) -> list[Any]:
        """Bind each cache's buffer as its past and its present, grown for ``seq`` more positions
        (new buffers for a new batch; an assigned past copied in); returns the buffers."""
        if not self._shared or self._shared[0].batch != batch:
            self._shared = [
                _SharedBuffer(spec, dtype, batch, self.max_len, self.capacity)
                for spec, dtype in zip(self._specs, self._dtypes)
            ]
        for buffer, value in zip(self._shared, past):
            if value is not buffer.value and self.length:
                buffer.reserve(self.length + seq, 0)
                buffer.load(value, self.length)
            buffer.reserve(self.length + seq, self.length)
            binding.bind_ortvalue_input(buffer.spec.input, buffer.value)
            binding.bind_ortvalue_output(buffer.spec.output, buffer.value)
            alias = self.meta.aliases.get(buffer.spec.output)
            if alias is not None:  # a cache read as keys and values: both outputs are this buffer
                binding.bind_ortvalue_output(alias, buffer.value)
        return [buffer.value for buffer in self._shared]

    def _bind_growing(self, binding: Any, batch: int, seq: int, past: list[Any]) -> list[Any]:
        """Bind ``past`` as the caches' inputs and, as their presents, views into the buffers
        the past is not in (:class:`_PingPong`); returns the presents."""
        for spec, value in zip(self._specs, past):
            binding.bind_ortvalue_input(spec.input, value)
        # Each OrtValue holds its view, and so its buffer, for as long as it lives.
        present = [
            self._ort.OrtValue.ortvalue_from_numpy(buffers.present(value, seq))
            for buffers, value in zip(self._buffers_for(batch), past)
        ]
        for spec, value in zip(self._specs, present):
            binding.bind_ortvalue_output(spec.output, value)
        return present

    def _run(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: list[Any]) -> np.ndarray:
        from .runtime.sessions import run_errors

        binding = self.session.io_binding()
        for name, value in zip(self.meta.inputs, (ids, mask, positions)):
            binding.bind_cpu_input(name, np.ascontiguousarray(value, dtype=np.int64))
        binding.bind_output("logits", "cpu")
        batch, seq = ids.shape
        present = (self._bind_shared if self.meta.shared else self._bind_growing)(binding, batch, seq, past)
        with run_errors(self.path) as options:
            self.session.run_with_iobinding(binding, options)
        self.past = present
        self.length += seq
        return binding.get_outputs()[0].numpy()

    def prefill(
        self, ids: np.ndarray, mask: np.ndarray | None = None, positions: np.ndarray | None = None
    ) -> np.ndarray:
        """Run the prompt ids [B,T] from an empty cache (mask: 1 = real token, default all;
        positions: default 0..T-1)."""
        self.length = 0
        if self.meta.shared:
            return self.step(ids, mask, positions, [b.value for b in self._shared] or [None] * len(self._specs))
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


def check_sampling(temperature: float, top_k: int) -> None:
    """One-line errors for sampling settings :func:`pick_token` cannot use: a temperature that
    is negative or not finite (0 = greedy), a negative top_k."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise UsageError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise UsageError(f"top_k must be >= 0 (0 = all tokens), got {top_k}")


def pick_token(
    logits: np.ndarray, temperature: float, top_k: int, rng: np.random.Generator, step: int | None = None
) -> int:
    """The next token from one row of logits [V]: argmax at temperature 0, else a draw from
    softmax(logits / temperature) over the top_k largest (all when top_k is 0).

    The softmax is taken in float64 from the logits less their maximum, so the largest is 0
    and no temperature (1e-320 included) makes inf - inf: a tiny one leaves the argmax(es)
    with all the probability, a huge one all tokens alike. -inf logits (masked tokens) are
    never drawn; NaN or +inf, or no finite logit, is a UsageError naming ``step`` (the index
    of the token being picked: 0 after the prefill, n after decode step n)."""
    check_sampling(temperature, top_k)
    row = np.asarray(logits, dtype=np.float64)
    top = row.max(initial=-np.inf)  # NaN when any is NaN
    if not np.isfinite(top):
        where = "" if step is None else "the prefill: " if step == 0 else f"decode step {step}: "
        raise UsageError(f"{where}the model's logits hold NaN or inf (largest {top}), so no token can be picked")
    if temperature == 0:
        return int(np.argmax(row))
    with np.errstate(under="ignore", over="ignore"):  # (row - top) / T may round to -inf, exp to 0
        scaled = (row - top) / temperature
    if 0 < top_k < scaled.size:
        cutoff = np.partition(scaled, -top_k)[-top_k]
        scaled = np.where(scaled >= cutoff, scaled, -np.inf)
    probs = np.exp(scaled)  # the argmax has exp(0) = 1, so the sum is >= 1
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
    check_sampling(temperature, top_k)
    rng = np.random.default_rng(seed)
    result = GenerateResult(list(prompt_ids))
    start = time.perf_counter()
    logits = session.prefill(np.asarray([prompt_ids], dtype=np.int64))[0, -1]
    result.prefill_seconds = time.perf_counter() - start
    start = time.perf_counter()
    while True:
        token = pick_token(logits, temperature, top_k, rng, step=len(result.tokens))
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


__all__ = ["DecodeSession", "GenerateResult", "check_request", "check_sampling", "generate", "pick_token"]
