"""A ViT-style digit classifier for every attention variant that fits the encoder family.

Data: scikit-learn's bundled 8x8 handwritten digits (``sklearn.datasets.load_digits``: 1797
images, shipped inside the package, nothing is downloaded), pixels scaled to [0, 1], split
75/25 by a fixed permutation (seed 0). Model: ``EncoderClassifier`` on 4x4 patches (4 patches
+ CLS = 5 tokens), 2 layers, D 32, 4 heads. Each variant trains with AdamW for a fixed number
of epochs (fixed seed: the same numbers every run on the same machine), is saved as an
attn2onnx checkpoint, loaded back, exported to ONNX and run in ONNX Runtime; the argmax of ORT
must equal PyTorch's on every test image.

    python samples/digits_vit.py                          # every encoder variant
    python samples/digits_vit.py --variants mha,dcmha --out out/digits
    python samples/digits_vit.py --quick                  # a few seconds per variant (tests)

Exit status 1 when ORT and PyTorch disagree on any test image.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make `samples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from samples import ort_session  # noqa: E402

SEED = 0
TEST_FRACTION = 0.25


@dataclass
class Settings:
    """Model size and training schedule (``quick`` shrinks both for the tests)."""

    d_model: int = 32
    heads: int = 4
    layers: int = 2
    patch_size: int = 4
    epochs: int = 12
    batch: int = 128
    lr: float = 5e-3
    weight_decay: float = 0.01
    train_limit: int | None = None  # use only the first n training images

    @classmethod
    def quick(cls) -> "Settings":
        return cls(d_model=16, heads=2, epochs=6, lr=1e-2, train_limit=512)


@dataclass
class DigitsResult:
    variant: str
    test_images: int
    torch_accuracy: float
    ort_accuracy: float
    agreement: float  # fraction of test images where ORT argmax == PyTorch argmax
    disagreements: int
    max_abs_logit_diff: float
    loss_before: float  # mean training cross-entropy at initialisation
    loss_after: float  # ... after training
    epoch_losses: list[float] = field(default_factory=list)
    train_seconds: float = 0.0  # wall time
    train_cpu_seconds: float = 0.0  # process CPU time (all threads): less sensitive to other jobs
    export_seconds: float = 0.0
    onnx_path: str = ""
    checkpoint_path: str = ""


def load_data(test_fraction: float = TEST_FRACTION, seed: int = SEED):
    """(x_train, y_train, x_test, y_test): x [n,1,8,8] float32 in [0,1], y int64 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(len(y) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def encoder_variants() -> list[str]:
    """Registered variants that fit the encoder family, in registry order."""
    from attn2onnx.variants import VARIANTS

    return [name for name, info in VARIANTS.items() if "encoder" in info.families]


def make_config(variant: str, settings: Settings, seed: int = SEED):
    from attn2onnx.models import ModelConfig

    tokens = (8 // settings.patch_size) ** 2 + 1
    return ModelConfig(
        family="encoder",
        variant=variant,
        image_size=8,
        patch_size=settings.patch_size,
        channels=1,
        num_classes=10,
        d_model=settings.d_model,
        heads=settings.heads,
        layers=settings.layers,
        max_len=tokens,
        seed=seed,
    )


@torch.no_grad()
def mean_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float(F.cross_entropy(model(x), y))


def train(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, settings: Settings, seed: int = SEED
) -> list[float]:
    """AdamW with a cosine schedule; returns the mean training loss of each epoch."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps_per_epoch = math.ceil(len(y) / settings.batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=settings.lr, total_steps=settings.epochs * steps_per_epoch, pct_start=0.1
    )
    losses = []
    for _ in range(settings.epochs):
        model.train()
        order = torch.randperm(len(y), generator=generator)
        total = 0.0
        for i in range(0, len(y), settings.batch):
            idx = order[i : i + settings.batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / len(y))
    return losses


def run_variant(
    variant: str, out_dir: str | Path, settings: Settings | None = None, threads: int = 2, seed: int = SEED, data=None
) -> DigitsResult:
    """Train, save, reload, export and compare one variant; returns the measurements."""
    import attn2onnx
    from attn2onnx.exporter import export
    from attn2onnx.sources import from_module

    settings = settings or Settings()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    x_train, y_train, x_test, y_test = data if data is not None else load_data(seed=seed)
    if settings.train_limit:
        x_train, y_train = x_train[: settings.train_limit], y_train[: settings.train_limit]
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)

    model = attn2onnx.build_model(make_config(variant, settings, seed))
    loss_before = mean_loss(model, xt, yt)
    start, cpu_start = time.perf_counter(), time.process_time()
    epoch_losses = train(model, xt, yt, settings, seed)
    train_seconds, train_cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    loss_after = mean_loss(model, xt, yt)

    # Round trip through an attn2onnx checkpoint: what gets exported is what a user would load.
    checkpoint = attn2onnx.save(model, out_dir / f"digits_{variant}.pt")
    model = attn2onnx.load(checkpoint)
    source = from_module(model)
    start = time.perf_counter()
    result = export(
        source.module,
        source.example_inputs(batch=2),
        out_dir / f"digits_{variant}.onnx",
        specs=source.specs,
        output_names=source.output_names,
        max_seq=source.max_seq,
    )
    export_seconds = time.perf_counter() - start

    with torch.inference_mode():
        torch_logits = source.module(torch.from_numpy(x_test)).numpy()
    sess = ort_session(result.path, threads=threads)
    (ort_logits,) = sess.run(None, {source.specs[0].name: x_test})
    torch_pred, ort_pred = torch_logits.argmax(-1), ort_logits.argmax(-1)
    return DigitsResult(
        variant=variant,
        test_images=len(y_test),
        torch_accuracy=float((torch_pred == y_test).mean()),
        ort_accuracy=float((ort_pred == y_test).mean()),
        agreement=float((torch_pred == ort_pred).mean()),
        disagreements=int((torch_pred != ort_pred).sum()),
        max_abs_logit_diff=float(np.abs(torch_logits - ort_logits).max()),
        loss_before=loss_before,
        loss_after=loss_after,
        epoch_losses=epoch_losses,
        train_seconds=train_seconds,
        train_cpu_seconds=train_cpu_seconds,
        export_seconds=export_seconds,
        onnx_path=str(result.path),
        checkpoint_path=str(checkpoint),
    )


def table(results: list[DigitsResult]) -> str:
    lines = [
        "| variant | test acc (PyTorch) | test acc (ORT) | ORT = PyTorch argmax | max abs logit diff | loss "
        "before -> after | train s (CPU s) | export s |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.variant} | {r.torch_accuracy:.2%} | {r.ort_accuracy:.2%} | "
            f"{r.test_images - r.disagreements}/{r.test_images} | {r.max_abs_logit_diff:.1e} | "
            f"{r.loss_before:.3f} -> {r.loss_after:.3f} | {r.train_seconds:.1f} ({r.train_cpu_seconds:.1f}) "
            f"| {r.export_seconds:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--variants", default="", help="comma-separated variants (default: every variant that fits the encoder family)"
    )
    parser.add_argument(
        "--out", default="out/digits", help="folder for checkpoints and ONNX files (default out/digits)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny model, few epochs (seconds per variant)")
    parser.add_argument("--epochs", type=int, default=None, help="override the number of epochs")
    parser.add_argument("--threads", type=int, default=2, help="torch and ORT intra-op threads (default 2)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--json", default=None, help="also write the results as JSON to this file")
    args = parser.parse_args(argv)

    known = encoder_variants()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()] or known
    unknown = [v for v in variants if v not in known]
    if unknown:
        parser.error(f"not an encoder variant: {', '.join(unknown)}; encoder variants: {', '.join(known)}")
    settings = Settings.quick() if args.quick else Settings()
    if args.epochs is not None:
        settings.epochs = args.epochs

    data = load_data(seed=args.seed)
    print(f"digits: {len(data[1])} train / {len(data[3])} test images, {settings}", flush=True)
    results = []
    for variant in variants:
        r = run_variant(variant, args.out, settings, threads=args.threads, seed=args.seed, data=data)
        print(
            f"{variant:>10}: test accuracy {r.torch_accuracy:.2%} (ORT {r.ort_accuracy:.2%}), "
            f"ORT agrees on {r.test_images - r.disagreements}/{r.test_images}, "
            f"loss {r.loss_before:.3f} -> {r.loss_after:.3f}, trained in {r.train_seconds:.1f} s "
            f"({r.train_cpu_seconds:.1f} CPU s)",
            flush=True,
        )
        results.append(r)
    print()
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0 if all(r.disagreements == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
