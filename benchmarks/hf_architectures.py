"""Hugging Face transformers folders: attention cores fused per architecture by this project's
``optimize --target ort``, by onnxscript's ``optimize_for_ort`` and by onnxruntime.transformers'
optimizer, each on the same stock export; then ours vs the stock export in ORT at a realistic size.

  python benchmarks/hf_architectures.py                 both tables into RESULTS.md "Transformers folders"
  python benchmarks/hf_architectures.py --fusion-only   the fusion table only (tiny models, ~10 min); the
                                                        section keeps the speed table of the last full run

Fusion: every architecture of tests/hf_configs.py (tiny random weights, eager attention, as
``attn2onnx export DIR`` loads it), exported once with ``attn2onnx export``; cores = the stock
graph's attention Softmax nodes plus fused attention ops already there. onnxruntime.transformers'
optimizer is given the model type it knows for the architecture (else "bert", its generic
default) with heads / hidden from the config; a tool that raises is reported as "failed".
Speed: three architectures at hidden 1024 (16 heads, 2 layers), batch 1, T in --lengths, ORT at 2
threads, stock and ours in one process, interleaved, medians; the ratio is stock / ours.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import hf_configs  # noqa: E402
from _results import RESULTS, cpu_model, replace_section  # noqa: E402

FUSED = ("MultiHeadAttention", "GroupQueryAttention", "Attention", "PackedAttention", "DcmhaAttention")
ORT_TOOL_TYPES = {"gpt2": "gpt2", "bert": "bert", "roberta": "bert", "t5": "t5", "vit": "vit"}
SECTION = "## Transformers folders"
SPEED_HEADER = "Speed, batch 1, ORT CPU at 2 threads"

# Realistic sizes for the speed table: hidden 1024, 16 heads, 2 layers.
WIDE = {
    "llama": dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=4),
    "gpt2": dict(n_embd=1024, n_head=16),
    "bert": dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16),
}


def attention_ops(path: Path) -> dict[str, int]:
    """Softmax and fused attention op counts of an ONNX file (graph and functions)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    nodes = list(model.graph.node) + [n for f in model.functions for n in f.node]
    for node in nodes:
        if node.op_type == "Softmax" or node.op_type in FUSED:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def fused(counts: dict[str, int]) -> int:
    return sum(n for op, n in counts.items() if op in FUSED)


def cli(*args: str) -> dict:
    """Run ``attn2onnx`` with --json where it takes it; the parsed output (or an error row)."""
    done = subprocess.run([sys.executable, "-m", "attn2onnx", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
    return json.loads(done.stdout) if "--json" in args else {}


def onnxscript_fused(stock: Path) -> int | str:
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    try:
        model = ir.load(str(stock))
        optimize_for_ort(model)
        with tempfile.TemporaryDirectory() as tmp:
            ir.save(model, f"{tmp}/m.onnx")
            return fused(attention_ops(Path(tmp) / "m.onnx"))
    except Exception as err:  # noqa: BLE001 - a third-party tool: report, go on
        return f"failed ({type(err).__name__})"


def ort_tool_fused(stock: Path, name: str, config: dict) -> int | str:
    from onnxruntime.transformers.optimizer import optimize_model

    heads = config.get("num_attention_heads") or config.get("n_head") or config.get("num_heads") or 0
    hidden = config.get("hidden_size") or config.get("n_embd") or config.get("d_model") or 0
    try:
        optimised = optimize_model(
            str(stock), model_type=ORT_TOOL_TYPES.get(name, "bert"), num_heads=heads, hidden_size=hidden
        )
        with tempfile.TemporaryDirectory() as tmp:
            optimised.save_model_to_file(f"{tmp}/m.onnx")
            return fused(attention_ops(Path(tmp) / "m.onnx"))
    except Exception as err:  # noqa: BLE001
        return f"failed ({type(err).__name__})"


def fusion_row(name: str, work: Path) -> dict:
    folder = hf_configs.save_tiny(name, work / name)
    config = json.loads((folder / "config.json").read_text())
    stock, ours = work / f"{name}.onnx", work / f"{name}.ort.onnx"
    row: dict = {"architecture": name}
    try:
        cli("export", str(folder), "-o", str(stock))
    except RuntimeError as err:
        return {**row, "error": f"export: {err}"}
    counts = attention_ops(stock)
    row["cores"] = counts.get("Softmax", 0) + fused(counts)
    try:
        cli("optimize", str(stock), "-o", str(ours), "--target", "ort")
        row["ours"] = fused(attention_ops(ours))
    except RuntimeError as err:
        row["ours"] = f"failed ({err})"
    row["onnxscript"] = onnxscript_fused(stock)
    row["ort_tool"] = ort_tool_fused(stock, name, config)
    return row


def save_wide(name: str, folder: Path) -> Path:
    """Architecture ``name`` at hidden 1024 (WIDE), random weights, 2 layers, 4096 positions."""
    import torch
    import transformers

    config_class, kwargs, model_class, _ = hf_configs.MODELS[name]
    positions = {"n_positions": 4096} if name == "gpt2" else {"max_position_embeddings": 4096}
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**{**kwargs, **WIDE[name], **positions})
    hf_configs.save_quietly(getattr(transformers, model_class)(config), folder)
    return folder


def run_ms(session, feeds: dict) -> float:
    """Milliseconds of one run."""
    start = time.perf_counter()
    session.run(None, feeds)
    return (time.perf_counter() - start) * 1e3


def speed_rows(work: Path, lengths: list[int], repeats: int) -> list[dict]:
    from attn2onnx.runtime import session

    rows = []
    for name in WIDE:
        folder = save_wide(name, work / f"{name}_wide")
        stock, ours = work / f"{name}_wide.onnx", work / f"{name}_wide.ort.onnx"
        cli("export", str(folder), "-o", str(stock))
        cli("optimize", str(stock), "-o", str(ours), "--target", "ort")
        sessions = {"stock": session(str(stock), threads=2), "ours": session(str(ours), threads=2)}
        inputs = {i.name: i for i in sessions["stock"].get_inputs()}
        vocab = hf_configs.VOCAB
        for seq in lengths:
            feeds = {}
            for input_name in inputs:
                if "mask" in input_name:
                    feeds[input_name] = np.ones((1, seq), np.int64)
                elif "position" in input_name:
                    feeds[input_name] = np.arange(seq, dtype=np.int64)[None]
                else:
                    feeds[input_name] = np.random.default_rng(0).integers(0, vocab, (1, seq), dtype=np.int64)
            times: dict[str, list[float]] = {"stock": [], "ours": []}
            for which in sessions:
                run_ms(sessions[which], feeds)  # warm-up
            for _ in range(repeats):
                for which in sessions:
                    times[which].append(run_ms(sessions[which], feeds))
            stock_ms, ours_ms = (statistics.median(times[k]) for k in ("stock", "ours"))
            rows.append({"architecture": name, "seq": seq, "stock_ms": stock_ms, "ours_ms": ours_ms})
            print(rows[-1], flush=True)
    return rows


def write(fusion: list[dict], speed: list[dict], command: str) -> None:
    lines = [
        SECTION,
        "",
        f"Command: `{command}`. Machine: {cpu_model()}, 2 cores, shared with other work while measured "
        "(ratios from one process, interleaved). Tiny random-weight models of tests/hf_configs.py, eager attention.",
        "",
        "| architecture | attention cores | fused by `optimize --target ort` | by onnxscript `optimize_for_ort` "
        "| by onnxruntime.transformers optimizer |",
        "|---|---|---|---|---|",
    ]
    for row in fusion:
        if "error" in row:
            lines.append(f"| {row['architecture']} | {row['error']} | | | |")
            continue
        cells = (row["architecture"], row["cores"], row["ours"], row["onnxscript"], row["ort_tool"])
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    if not speed:
        lines += previous_speed_table()
    else:
        lines += [
            "",
            f"{SPEED_HEADER}, hidden 1024, 16 heads, 2 layers (median ms of interleaved runs):",
            "",
            "| architecture | T | stock export | ours (`--target ort`) | stock / ours |",
            "|---|---|---|---|---|",
        ]
        for row in speed:
            lines.append(
                f"| {row['architecture']} | {row['seq']} | {row['stock_ms']:.1f} | {row['ours_ms']:.1f} "
                f"| {row['stock_ms'] / row['ours_ms']:.2f}x |"
            )
    replace_section(SECTION, "\n".join(lines))


def previous_speed_table() -> list[str]:
    """The speed table of the section's last full run (a --fusion-only run keeps it), from its
    header line to the end of the table; none if the section has none."""
    text = RESULTS.read_text() if RESULTS.exists() else ""
    start = text.find(SPEED_HEADER, text.find(SECTION)) if SECTION in text else -1
    if start < 0:
        return []
    lines = text[start:].splitlines()
    end = next((i for i, line in enumerate(lines) if i > 2 and not line.startswith("|")), len(lines))
    header = lines[0] if "last full run" in lines[0] else lines[0].rstrip(":") + ", from the last full run:"
    return ["", header, *lines[1:end]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fusion-only", action="store_true")
    parser.add_argument("--lengths", default="512,2048")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        fusion = []
        for name in hf_configs.ARCHITECTURES:
            fusion.append(fusion_row(name, work))
            print(fusion[-1], flush=True)
        speed = [] if args.fusion_only else speed_rows(work, [int(t) for t in args.lengths.split(",")], args.repeats)
    write(fusion, speed, "python benchmarks/hf_architectures.py" + (" --fusion-only" if args.fusion_only else ""))


if __name__ == "__main__":
    main()
