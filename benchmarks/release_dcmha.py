"""DCMHA as the DCFormer release writes it: PyTorch eager vs stock ONNX Runtime vs optimised ORT.

Part 1 (issue 9): the release-style attention layer (tests/corpus_dcformer/release_style.py,
random weights in the release layout, D=512, N=8) with its precomputed RoPE table and causal
mask buffer, exported with ``attn2onnx.export`` and optimised with ``--target ort`` (one
DcmhaAttention, the native kernel), at T=256 and T=1024, batch 1, 2 threads.

Part 2 (issue 10 part 4): a whole release-style LM (4 layers, D=512, LG windows) written as a
release checkpoint folder, imported with ``attn2onnx export DIR --optimize``, against the
release-style eager forward of the same weights at T=1024.

Part 3 (``--mask-input``): the layer with its mask as a graph input (``forward(x, mask)``, the
caller's causal mask [1,1,T,T] fed at run time): fused into DcmhaAttention with the ``attn_mask``
input, at T=1024.

Usage: ``python benchmarks/release_dcmha.py [--threads 2] [--runs 10] [--mask-input] [--write]``
(``--write`` replaces the section in RESULTS.md).
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).parent))

from _results import cpu_model, replace_section  # noqa: E402
from corpus_dcformer.release_style import MaskedLayer, MaskInputLayer, release_layer, release_lm  # noqa: E402
from dcformer_release import random_release_state, write_release_folder  # noqa: E402

import attn2onnx  # noqa: E402
from attn2onnx.cli import main as cli_main  # noqa: E402
from attn2onnx.passes import optimize_model  # noqa: E402
from attn2onnx.runtime import session  # noqa: E402

HEADER = "## DCFormer release-style DCMHA: eager vs ORT (benchmarks/release_dcmha.py)"
LAYER = dict(vocab_size=1024, n_layer=1, n_head=8, dim=512, window_size=None)
LM = dict(vocab_size=1024, n_layer=4, n_head=8, dim=512, window_size=256, block_size=2048)


def median_ms(fn: Callable[[], object], runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def layer_rows(folder: Path, threads: int, runs: int) -> list[str]:
    """Eager / stock ORT / optimised ORT for the layer at T = 256 and 1024."""
    torch.set_num_threads(threads)
    layer = MaskedLayer(release_layer(LAYER, random_release_state(LAYER)), 500000.0, 2048).eval()
    stock_path = folder / "layer.onnx"
    attn2onnx.export(layer, (torch.randn(1, 16, 512),), stock_path)
    stock = onnx.load(stock_path)
    fused, _ = optimize_model(stock, target="ort")
    sessions = {"stock": session(stock, native=False, threads=threads), "opt": session(fused, threads=threads)}
    rows = []
    for t in (256, 1024):
        x = torch.randn(1, t, 512)
        feeds = {stock.graph.input[0].name: x.numpy()}
        with torch.no_grad():
            eager = median_ms(lambda: layer(x), runs)
        stock_ms = median_ms(lambda: sessions["stock"].run(None, feeds), runs)
        opt_ms = median_ms(lambda: sessions["opt"].run(None, feeds), runs)
        rows.append(f"| layer | {t} | {eager:.1f} | {stock_ms:.1f} | {opt_ms:.1f} | {eager / opt_ms:.1f}x |")
    return rows


def mask_input_row(folder: Path, threads: int, runs: int, t: int = 1024) -> str:
    """Eager / stock ORT / optimised ORT for the layer whose causal mask is a graph input."""
    torch.set_num_threads(threads)
    layer = MaskInputLayer(release_layer(LAYER, random_release_state(LAYER)), 500000.0, 2048).eval()
    path = folder / "mask_input.onnx"
    attn2onnx.export(layer, (torch.randn(1, 16, 512), torch.ones(1, 1, 16, 16, dtype=torch.bool)), path)
    stock = onnx.load(path)
    fused, _ = optimize_model(stock, target="ort")
    sessions = {"stock": session(stock, native=False, threads=threads), "opt": session(fused, threads=threads)}
    x, mask = torch.randn(1, t, 512), torch.ones(t, t, dtype=torch.bool).tril()[None, None]
    feeds = dict(zip([i.name for i in stock.graph.input], (x.numpy(), mask.numpy())))
    with torch.no_grad():
        eager = median_ms(lambda: layer(x, mask), runs)
    stock_ms = median_ms(lambda: sessions["stock"].run(None, feeds), runs)
    opt_ms = median_ms(lambda: sessions["opt"].run(None, feeds), runs)
    name = "layer, causal mask as graph input (attn_mask)"
    return f"| {name} | {t} | {eager:.1f} | {stock_ms:.1f} | {opt_ms:.1f} | {eager / opt_ms:.1f}x |"


def lm_row(folder: Path, threads: int, runs: int) -> str:
    """The imported LM (export DIR --optimize) vs the release-style eager LM at T = 1024."""
    torch.set_num_threads(threads)
    state = write_release_folder(folder / "release", LM)
    out = folder / "lm.onnx"
    if cli_main(["export", str(folder / "release"), "-o", str(out), "--optimize", "--target", "ort"]) not in (0, None):
        raise SystemExit("attn2onnx export DIR --optimize failed")
    lm = release_lm(LM, state, max_len=2048)
    ids = torch.randint(0, LM["vocab_size"], (1, 1024))
    sess = session(str(out), threads=threads)
    feeds = {"input_ids": ids.numpy().astype(np.int64), "key_padding_mask": np.ones((1, 1024), dtype=bool)}
    with torch.no_grad():
        eager = median_ms(lambda: lm(ids), runs)
    opt_ms = median_ms(lambda: sess.run(None, feeds), runs)
    return f"| LM, 4 layers (imported) | 1024 | {eager:.1f} | - | {opt_ms:.1f} | {eager / opt_ms:.1f}x |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--mask-input", action="store_true", help="only the row of the layer with a mask input")
    parser.add_argument("--write", action="store_true", help="replace this section of RESULTS.md")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.mask_input:
            print(mask_input_row(Path(tmp), args.threads, args.runs))
            return 0
        rows = layer_rows(Path(tmp), args.threads, args.runs) + [lm_row(Path(tmp), args.threads, args.runs)]
        rows.append(mask_input_row(Path(tmp), args.threads, args.runs))
    lines = [
        HEADER,
        "",
        f"Command: `python benchmarks/release_dcmha.py --threads {args.threads} --runs {args.runs} --write`",
        f"Machine: {cpu_model()}, {args.threads} threads (ORT intra-op and torch); "
        f"date {datetime.date.today()}; batch 1, median of {args.runs} runs.",
        "",
        "| model | T | eager ms | stock ORT ms | optimised ORT ms | eager / optimised |",
        "|---|---|---|---|---|---|",
        *rows,
    ]
    print("\n".join(lines))
    if args.write:
        replace_section(HEADER, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
