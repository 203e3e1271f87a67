"""A character-level causal LM trained on text that ships with Python, exported to ONNX, and
greedy generation in ONNX Runtime checked token for token against PyTorch.

Text: the Zen of Python (``this`` module, rot13-decoded; 856 characters) by default, or the
source of any stdlib module (``--text module:textwrap``, read with ``inspect.getsource``).
Model: ``CausalLM`` around a causal-capable variant (default dcmha), 2 layers, D 64, 4 heads,
context 64 characters, vocabulary = the text's characters. It trains with AdamW on random
windows (300 steps of 32 windows, fixed seed), is saved as an attn2onnx checkpoint, loaded
back and exported with a dynamic sequence length. Generation is greedy and re-runs the whole
prefix (the last 64 characters once longer) every step, in PyTorch and in ORT independently;
the two token streams must be identical. The decode graph (``attn2onnx export --decode``) then
generates through ``attn2onnx.generate`` (prefill once, one step per character, caches kept in
ORT) within the context, and must give PyTorch's first tokens.

    python samples/char_lm.py                              # dcmha on the Zen of Python
    python samples/char_lm.py --variant mha --out out/char_lm --tokens 200
    python samples/char_lm.py --quick                      # a few seconds (tests)

Exit status 1 when the ORT and PyTorch generations differ.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import importlib
import inspect
import io
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make `samples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from samples import ort_session  # noqa: E402

SEED = 0
DEFAULT_PROMPT = "Beautiful is "


@dataclass
class Settings:
    """Model size and training schedule (``quick`` shrinks both for the tests)."""

    d_model: int = 64
    heads: int = 4
    layers: int = 2
    context: int = 64
    steps: int = 300
    batch: int = 32
    lr: float = 5e-3
    weight_decay: float = 0.01
    tokens: int = 200  # characters generated after the prompt

    @classmethod
    def quick(cls) -> "Settings":
        return cls(d_model=32, heads=2, layers=1, context=32, steps=60, batch=16, lr=1e-2, tokens=24)


@dataclass
class CharLMResult:
    variant: str
    text: str
    text_chars: int
    vocab_size: int
    loss_before: float  # mean cross-entropy (nats/char) on a fixed set of windows, at init
    loss_after: float  # ... after training
    train_seconds: float  # wall time
    train_cpu_seconds: float  # process CPU time (all threads): less sensitive to other jobs on the machine
    export_seconds: float
    prompt: str
    torch_tokens: list[int] = field(default_factory=list)
    ort_tokens: list[int] = field(default_factory=list)
    torch_sample: str = ""
    ort_sample: str = ""
    identical: bool = False
    first_mismatch: int | None = None  # index into the generated tokens
    max_abs_logit_diff: float = 0.0  # over every step of the PyTorch-driven sequence
    onnx_path: str = ""
    checkpoint_path: str = ""
    decode_path: str = ""  # the decode graph (export --decode): prefill once, then one step per character
    decode_tokens: list[int] = field(default_factory=list)  # greedy through attn2onnx.generate, within the context
    decode_identical: bool = False  # decode_tokens equal PyTorch's first tokens
    decode_tokens_per_s: float = 0.0


def zen_of_python() -> str:
    """The Zen of Python from the stdlib ``this`` module (stored rot13-encoded in ``this.s``)."""
    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen
        import this
    return codecs.decode(this.s, "rot13")


def load_text(spec: str = "zen") -> str:
    """``zen`` or ``module:NAME`` (the source of a stdlib module)."""
    if spec == "zen":
        return zen_of_python()
    if spec.startswith("module:"):
        return inspect.getsource(importlib.import_module(spec.split(":", 1)[1]))
    raise ValueError(f"unknown text {spec!r}; use 'zen' or 'module:NAME'")


class Vocab:
    def __init__(self, text: str) -> None:
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        return [self.index[c] for c in text]

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)


def causal_variants() -> list[str]:
    from attn2onnx.variants import VARIANTS

    return [name for name, info in VARIANTS.items() if info.causal and "lm" in info.families]


def make_config(variant: str, vocab_size: int, settings: Settings, seed: int = SEED):
    from attn2onnx.models import ModelConfig

    return ModelConfig(
        family="lm",
        variant=variant,
        vocab_size=vocab_size,
        d_model=settings.d_model,
        heads=settings.heads,
        layers=settings.layers,
        max_len=settings.context,
        seed=seed,
    )


def windows(data: torch.Tensor, starts: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs [B, length] and next-character targets [B, length] at the given start offsets."""
    idx = starts[:, None] + torch.arange(length + 1)[None, :]
    chunk = data[idx]
    return chunk[:, :-1], chunk[:, 1:]


@torch.no_grad()
def mean_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    logits = model(x)
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)))


def train(model: torch.nn.Module, data: torch.Tensor, settings: Settings, seed: int = SEED) -> list[float]:
    """AdamW, one-cycle schedule, random windows; returns the loss of every step."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=settings.lr, total_steps=settings.steps, pct_start=0.1
    )
    high = len(data) - settings.context - 1
    losses = []
    model.train()
    for _ in range(settings.steps):
        x, y = windows(data, torch.randint(0, high + 1, (settings.batch,), generator=generator), settings.context)
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def greedy(next_logits: Callable[[np.ndarray], np.ndarray], prompt: list[int], tokens: int, context: int) -> list[int]:
    """Greedy decoding that re-runs the whole prefix (its last ``context`` tokens) each step.
    ``next_logits(ids [1,T] int64) -> logits [V]`` of the last position."""
    ids = list(prompt)
    for _ in range(tokens):
        window = np.asarray(ids[-context:], dtype=np.int64)[None, :]
        ids.append(int(np.argmax(next_logits(window))))
    return ids[len(prompt) :]


def run_variant(
    variant: str,
    out_dir: str | Path,
    settings: Settings | None = None,
    text: str = "zen",
    prompt: str = DEFAULT_PROMPT,
    threads: int = 2,
    seed: int = SEED,
) -> CharLMResult:
    """Train, save, reload, export, and generate in PyTorch and ORT; returns the measurements."""
    import attn2onnx
    from attn2onnx.exporter import export
    from attn2onnx.sources import from_module

    settings = settings or Settings()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = load_text(text)
    vocab = Vocab(corpus)
    missing = sorted(set(prompt) - set(vocab.chars))
    if missing:
        raise ValueError(f"prompt characters not in the text: {''.join(missing)!r}")
    data = torch.tensor(vocab.encode(corpus), dtype=torch.int64)
    if len(data) <= settings.context + 1:
        raise ValueError(f"text has {len(data)} characters; need more than the context {settings.context} + 1")

    model = attn2onnx.build_model(make_config(variant, len(vocab), settings, seed))
    # A fixed evaluation set: 64 windows spread evenly over the text.
    starts = torch.linspace(0, len(data) - settings.context - 1, 64).long()
    eval_x, eval_y = windows(data, starts, settings.context)
    loss_before = mean_loss(model, eval_x, eval_y)
    start, cpu_start = time.perf_counter(), time.process_time()
    train(model, data, settings, seed)
    train_seconds, train_cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    loss_after = mean_loss(model, eval_x, eval_y)

    checkpoint = attn2onnx.save(model, out_dir / f"char_lm_{variant}.pt")
    model = attn2onnx.load(checkpoint)
    source = from_module(model)
    start = time.perf_counter()
    result = export(
        source.module,
        source.example_inputs(batch=2, seq=min(16, settings.context)),
        out_dir / f"char_lm_{variant}.onnx",
        specs=source.specs,
        output_names=source.output_names,
        max_seq=source.max_seq,
    )
    export_seconds = time.perf_counter() - start
    sess = ort_session(result.path, threads=threads)
    names = [i.name for i in sess.get_inputs()]

    def feeds(ids: np.ndarray) -> dict[str, np.ndarray]:
        available = {"input_ids": ids, "key_padding_mask": np.ones(ids.shape, dtype=bool)}
        return {n: available[n] for n in names}

    def torch_logits(ids: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return source.module(torch.from_numpy(ids)).numpy()

    def ort_logits(ids: np.ndarray) -> np.ndarray:
        return sess.run(None, feeds(ids))[0]

    prompt_ids = vocab.encode(prompt)
    torch_tokens = greedy(lambda ids: torch_logits(ids)[0, -1], prompt_ids, settings.tokens, settings.context)
    ort_tokens = greedy(lambda ids: ort_logits(ids)[0, -1], prompt_ids, settings.tokens, settings.context)
    # Logit parity on every prefix PyTorch's generation went through (all positions).
    stream = prompt_ids + torch_tokens
    max_diff = 0.0
    for step in range(settings.tokens):
        ids = np.asarray(stream[: len(prompt_ids) + step][-settings.context :], dtype=np.int64)[None, :]
        max_diff = max(max_diff, float(np.abs(torch_logits(ids) - ort_logits(ids)).max()))
    mismatch = next((i for i, (a, b) in enumerate(zip(torch_tokens, ort_tokens)) if a != b), None)
    decode = generate_with_decode_graph(
        model,
        out_dir / f"char_lm_{variant}.decode.onnx",
        prompt_ids,
        min(settings.tokens, settings.context - len(prompt_ids) + 1),
        threads,
    )
    return CharLMResult(
        variant=variant,
        text=text,
        text_chars=len(corpus),
        vocab_size=len(vocab),
        loss_before=loss_before,
        loss_after=loss_after,
        train_seconds=train_seconds,
        train_cpu_seconds=train_cpu_seconds,
        export_seconds=export_seconds,
        prompt=prompt,
        torch_tokens=torch_tokens,
        ort_tokens=ort_tokens,
        torch_sample=vocab.decode(torch_tokens),
        ort_sample=vocab.decode(ort_tokens),
        identical=torch_tokens == ort_tokens,
        first_mismatch=mismatch,
        max_abs_logit_diff=max_diff,
        onnx_path=str(result.path),
        checkpoint_path=str(checkpoint),
        decode_path=str(out_dir / f"char_lm_{variant}.decode.onnx"),
        decode_tokens=decode.tokens,
        decode_identical=decode.tokens == torch_tokens[: len(decode.tokens)],
        decode_tokens_per_s=decode.tokens_per_s,
    )


def generate_with_decode_graph(model: torch.nn.Module, path: Path, prompt_ids: list[int], tokens: int, threads: int):
    """Export the decode graph and generate greedily through attn2onnx.generate (prefill once,
    then one step per token with the caches kept in ORT). The cache grows with every token, so
    it generates within the context only (positions < max_len), unlike the sliding re-run."""
    from attn2onnx.generate import DecodeSession, generate
    from attn2onnx.models.decode import export_decode

    export_decode(model, path)
    return generate(DecodeSession(str(path), threads=threads), prompt_ids, tokens)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variant", default="dcmha", help="a causal-capable variant (default dcmha)")
    parser.add_argument(
        "--text", default="zen", help="'zen' (the Zen of Python) or 'module:NAME' (a stdlib module's source)"
    )
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument(
        "--tokens", type=int, default=None, help="characters to generate (default 200, 24 with --quick)"
    )
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 300, 60 with --quick)")
    parser.add_argument("--out", default="out/char_lm", help="folder for the checkpoint and the ONNX file")
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps (seconds)")
    parser.add_argument("--threads", type=int, default=2, help="torch and ORT intra-op threads (default 2)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--json", default=None, help="also write the results as JSON to this file")
    args = parser.parse_args(argv)

    known = causal_variants()
    if args.variant not in known:
        parser.error(f"{args.variant!r} cannot make a causal LM; causal variants: {', '.join(known)}")
    settings = Settings.quick() if args.quick else Settings()
    if args.tokens is not None:
        settings.tokens = args.tokens
    if args.steps is not None:
        settings.steps = args.steps
    try:
        r = run_variant(
            args.variant, args.out, settings, text=args.text, prompt=args.prompt, threads=args.threads, seed=args.seed
        )
    except ValueError as e:
        parser.error(str(e))
    print(f"{r.variant}: {r.text} ({r.text_chars} chars, vocab {r.vocab_size}); {settings}")
    print(
        f"loss {r.loss_before:.3f} -> {r.loss_after:.3f} nats/char, trained in {r.train_seconds:.1f} s "
        f"({r.train_cpu_seconds:.1f} CPU s), "
        f"exported in {r.export_seconds:.1f} s to {r.onnx_path}"
    )
    print(f"--- PyTorch greedy ({len(r.torch_tokens)} chars after {r.prompt!r}):\n{r.prompt}{r.torch_sample}")
    print(f"--- ONNX Runtime greedy:\n{r.prompt}{r.ort_sample}")
    if r.identical:
        print(
            f"--- identical: {len(r.torch_tokens)}/{len(r.torch_tokens)} tokens; max abs logit diff "
            f"{r.max_abs_logit_diff:.1e}"
        )
    else:
        print(f"--- MISMATCH at generated token {r.first_mismatch}; max abs logit diff {r.max_abs_logit_diff:.1e}")
    verdict = "identical to PyTorch's first tokens" if r.decode_identical else "MISMATCH with PyTorch"
    print(
        f"--- decode graph (attn2onnx generate): {len(r.decode_tokens)} tokens, {verdict}, "
        f"{r.decode_tokens_per_s:.0f} tokens/s"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(r), indent=2))
    return 0 if r.identical and r.decode_identical else 1


if __name__ == "__main__":
    sys.exit(main())
