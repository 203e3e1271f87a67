"""Progress on long work: stage names and tqdm bars on stderr, shown only to a person.

A command makes one :class:`Progress` (``Progress.for_command(json_output=args.json)``) and
reports through it. It shows anything only when stderr is a terminal and the command does not
print ``--json`` (stdout then is one JSON document, and a log or a pipe gets no carriage-return
noise); otherwise every call is a no-op. Bars are tqdm's and clear themselves when done
(``leave=False``), so what stays on the screen is the command's own output::

    progress = Progress.for_command(json_output=args.json)
    progress.stage("loading the model")              # a step with no count: one line
    with progress.bar(len(cases), "parity cases", unit="case") as bar:
        for case in cases:
            bar.set_postfix_str(case.name)             # what it is doing now
            ...
            bar.update()
    for name in progress.iterate(variants, "variants", unit="variant"):
        ...

``bar`` returns a real ``tqdm`` (``disable=True`` when progress is off, where tqdm prints
nothing), so ``update``, ``set_postfix_str`` and ``set_description`` all work either way.
``stage`` writes through ``tqdm.write`` so that a line never breaks a bar being drawn.
"""

from __future__ import annotations

import sys
from typing import IO, Callable, Collection, Iterator, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def shown(stream: IO[str] | None = None, *, json_output: bool = False) -> bool:
    """Whether progress goes to ``stream`` (default stderr): a terminal, and no ``--json``."""
    stream = sys.stderr if stream is None else stream
    if json_output:
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream (pytest's capture)
        return False


class Progress:
    """Stage lines and bars on ``stream`` when ``enabled``; nothing at all otherwise."""

    def __init__(self, enabled: bool, stream: IO[str] | None = None) -> None:
        self.enabled = enabled
        self.stream = sys.stderr if stream is None else stream

    @classmethod
    def for_command(cls, *, json_output: bool = False) -> "Progress":
        """Progress on stderr when it is a terminal and the command prints no JSON."""
        return cls(shown(json_output=json_output))

    def stage(self, text: str) -> None:
        """Say that a step without a count starts (``exporting with torch.onnx ...``)."""
        if self.enabled:
            tqdm.write(f"{text} ...", file=self.stream)

    def bar(self, total: int | None, desc: str, *, unit: str = "it") -> tqdm:
        """A bar over ``total`` steps named ``desc``; use it as a context manager and call
        ``update()`` per step (``set_postfix_str`` names the current one)."""
        return tqdm(
            total=total,
            desc=desc,
            unit=f" {unit}",  # "2.50 case/s", not "2.50case/s"
            file=self.stream,
            disable=not self.enabled,
            leave=False,
            dynamic_ncols=True,
        )

    def iterate(
        self, items: Collection[T], desc: str, *, unit: str = "it", label: Callable[[T], str] | None = None
    ) -> Iterator[T]:
        """``items`` with a bar that advances as each is done, naming the current one:
        ``label(item)``, or the item itself when it is a string."""
        with self.bar(len(items), desc, unit=unit) as bar:
            for item in items:
                text = label(item) if label is not None else item if isinstance(item, str) else None
                if text is not None:
                    bar.set_postfix_str(text)
                yield item
                bar.update()
