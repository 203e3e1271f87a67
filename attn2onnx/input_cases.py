"""A parity check's inputs as one .npz, so that a failing case can be replayed exactly
(``validate`` / ``export`` ``--save-inputs``, ``validate --load-inputs``).

Array ``case{i}/{name}`` holds each tensor fed in case ``i``, cases in the order they ran. A
decode case (``validate --decode``) holds ``input_ids``, ``attention_mask`` and
``position_ids`` over prompt + steps and ``case{i}/prompt``, the prompt length: the prefill and
every step feed slices of them (the caches are the graph's own outputs).
"""

from __future__ import annotations

import os
import re
from typing import Iterable, Mapping, Sequence

import numpy as np

from .errors import UsageError
from .io_spec import InputSpec, check_feeds

PROMPT = "prompt"  # a decode case's prompt length
DECODE_INPUTS = ("input_ids", "attention_mask", "position_ids")
_KEY = re.compile(r"case(\d+)/(.+)")

Case = Mapping[str, np.ndarray]


def save_cases(path: str | os.PathLike, cases: Sequence[Case], inputs: Iterable[str | os.PathLike | None] = ()) -> None:
    """Write ``cases`` to ``path`` (.npz, atomically; never over one of ``inputs``)."""
    from .fileio import atomic_output

    arrays = {f"case{i}/{name}": np.asarray(value) for i, case in enumerate(cases) for name, value in case.items()}
    with atomic_output(path, inputs=inputs) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def cases_from_arrays(arrays: Mapping[str, np.ndarray], path: str) -> list[dict[str, np.ndarray]]:
    """The cases of a file written by :func:`save_cases` (its arrays, read from ``path``); any
    other content is a UsageError."""
    cases: dict[int, dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        match = _KEY.fullmatch(key)
        if match is None:
            raise UsageError(f"{path}: array {key!r} is not an input saved by --save-inputs (case<N>/<input name>)")
        cases.setdefault(int(match.group(1)), {})[match.group(2)] = value
    if not cases:
        raise UsageError(f"{path}: holds no saved inputs")
    return [cases[i] for i in sorted(cases)]


def check_cases(specs: Sequence[InputSpec], cases: Sequence[Case]) -> None:
    """Refuse (UsageError naming the case) a saved case that does not fit ``specs``, or none."""
    if not cases:
        raise UsageError("no saved cases to run")
    for i, case in enumerate(cases):
        try:
            check_feeds(specs, dict(case))
        except UsageError as e:
            raise UsageError(f"saved case {i}: {e}") from None


def check_decode_cases(cases: Sequence[Case], vocab: int, max_len: int) -> None:
    """Refuse (UsageError naming the case) a saved decode case that is not int64 ids in
    [0, ``vocab``), a 0/1 mask and the padded index as positions, all [batch, prompt + steps]
    within ``max_len``, with a prompt of 1 .. total - 1 tokens; or none."""
    if not cases:
        raise UsageError("no saved cases to run")
    for i, case in enumerate(cases):
        missing = [n for n in (*DECODE_INPUTS, PROMPT) if n not in case]
        extra = sorted(set(case) - {*DECODE_INPUTS, PROMPT})
        if missing or extra:
            raise UsageError(
                f"saved case {i}: a decode case holds {', '.join((*DECODE_INPUTS, PROMPT))}; "
                f"{'missing ' + ', '.join(missing) if missing else 'unexpected ' + ', '.join(extra)}"
            )
        ids, mask, positions, prompt = (np.asarray(case[n]) for n in (*DECODE_INPUTS, PROMPT))
        if ids.ndim != 2 or ids.dtype != np.int64 or not ids.size or ids.min() < 0 or ids.max() >= vocab:
            raise UsageError(f"saved case {i}: input_ids must be int64 [batch, total] ids in [0, {vocab})")
        batch, total = ids.shape
        if total > max_len:
            raise UsageError(f"saved case {i}: {total} positions exceed the model's max_len {max_len}")
        if mask.shape != ids.shape or mask.dtype != np.int64 or not np.isin(mask, (0, 1)).all():
            raise UsageError(f"saved case {i}: attention_mask must be int64 0/1 of input_ids' shape {[batch, total]}")
        if positions.shape != ids.shape or not (positions == np.arange(total)).all():
            raise UsageError(f"saved case {i}: position_ids must be the padded index 0 .. {total - 1} of every row")
        if prompt.shape != () or prompt.dtype.kind not in "iu" or not 1 <= int(prompt) < total:
            raise UsageError(f"saved case {i}: prompt must be one integer in 1 .. {total - 1}")


__all__ = ["PROMPT", "save_cases", "cases_from_arrays", "check_cases", "check_decode_cases"]
