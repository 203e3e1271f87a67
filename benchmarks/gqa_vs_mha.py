"""Grouped-query attention in ONNX Runtime's CPU provider: com.microsoft.GroupQueryAttention
(K/V read once, Hkv heads) against MultiHeadAttention on K/V repeated to every head (what
fuse_standard_attention emitted for grouped cores before), the two forms it can choose.

  python benchmarks/gqa_vs_mha.py [--lengths 512,2048] [--repeats 7]

Batch 1, 16 query heads, 4 K/V heads, head dim 64, ORT at 2 threads; two masks: causal alone
(GQA's causal mode vs MHA's unidirectional) and causal + left padding as an additive mask
[B,1,T,S] (GQA causal=0 with attention_bias vs MHA's attention_bias), as an HF decoder's
padded prefill has it. The sessions run interleaved in one process; medians; the ratio is
MHA / GQA (above 1: GQA faster). Prints the table (no file is written).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

HEADS, KV_HEADS, HEAD_DIM = 16, 4, 64
FLOAT = TensorProto.FLOAT


def _inputs(bias: bool) -> list:
    names = [
        ("q", ["B", "T", HEADS * HEAD_DIM]),
        ("k", ["B", "T", KV_HEADS * HEAD_DIM]),
        ("v", ["B", "T", KV_HEADS * HEAD_DIM]),
    ]
    names += [("bias", ["B", 1, "T", "T"])] if bias else []
    return [helper.make_tensor_value_info(n, FLOAT, s) for n, s in names]


def _model(nodes: list, bias: bool, init: list) -> bytes:
    graph = helper.make_graph(nodes, "g", _inputs(bias), [helper.make_tensor_value_info("o", FLOAT, None)], init)
    opsets = [helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def gqa(bias: bool) -> bytes:
    """GroupQueryAttention, no cache: seqlens_k = T - 1, total = T; causal mode without a bias."""
    nodes = [
        helper.make_node("Shape", ["k"], ["len"], start=1, end=2),
        helper.make_node("Cast", ["len"], ["len32"], to=TensorProto.INT32),
        helper.make_node("Sub", ["len32", "one"], ["last"]),
        helper.make_node("Shape", ["k"], ["rows"], start=0, end=1),
        helper.make_node("Expand", ["last", "rows"], ["seqlens"]),
        helper.make_node("Squeeze", ["len32"], ["total"]),
        helper.make_node(
            "GroupQueryAttention",
            ["q", "k", "v", "", "", "seqlens", "total", "", "", "", "bias" if bias else ""],
            ["o"],
            domain="com.microsoft",
            num_heads=HEADS,
            kv_num_heads=KV_HEADS,
            causal=0 if bias else 1,
        ),
    ]
    return _model(nodes, bias, [numpy_helper.from_array(np.ones(1, np.int32), "one")])


def mha(bias: bool) -> bytes:
    """K / V repeated to every head (Reshape, Expand, Reshape), then MultiHeadAttention."""
    rep = HEADS // KV_HEADS
    nodes = []
    for x in "kv":
        nodes += [
            helper.make_node("Reshape", [x, "s5"], [f"{x}5"]),
            helper.make_node("Expand", [f"{x}5", "e5"], [f"{x}e"]),
            helper.make_node("Reshape", [f"{x}e", "s3"], [f"{x}r"]),
        ]
    inputs = ["q", "kr", "vr"] + (["", "", "bias"] if bias else [])
    attrs = {} if bias else {"unidirectional": 1}
    nodes.append(
        helper.make_node("MultiHeadAttention", inputs, ["o"], domain="com.microsoft", num_heads=HEADS, **attrs)
    )
    init = [
        numpy_helper.from_array(np.array([0, 0, KV_HEADS, 1, HEAD_DIM]), "s5"),
        numpy_helper.from_array(np.array([1, 1, 1, rep, 1]), "e5"),
        numpy_helper.from_array(np.array([0, 0, HEADS * HEAD_DIM]), "s3"),
    ]
    return _model(nodes, bias, init)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="512,2048")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 2, 1
    sessions = {
        (kind, mask): ort.InferenceSession(make(mask == "padding"), options, providers=["CPUExecutionProvider"])
        for kind, make in (("gqa", gqa), ("mha", mha))
        for mask in ("causal", "padding")
    }
    print("| mask | T | GQA ms | MHA (K/V repeated) ms | MHA / GQA |\n|---|---|---|---|---|")
    for seq in (int(t) for t in args.lengths.split(",")):
        rng = np.random.default_rng(0)
        feeds = {n: rng.standard_normal((1, seq, w * HEAD_DIM)).astype(np.float32) for n, w in (("q", 16), ("k", 4))}
        feeds["v"] = rng.standard_normal((1, seq, KV_HEADS * HEAD_DIM)).astype(np.float32)
        real = np.arange(seq) >= seq // 8  # the first eighth is left padding
        allowed = real[None, None, None, :] & np.tril(np.ones((seq, seq), bool))
        padded = {**feeds, "bias": np.where(allowed, 0, np.finfo(np.float32).min).astype(np.float32)}
        times: dict = {key: [] for key in sessions}
        for key, session in sessions.items():
            session.run(None, padded if key[1] == "padding" else feeds)  # warm-up
        for _ in range(args.repeats):
            for key, session in sessions.items():
                start = time.perf_counter()
                session.run(None, padded if key[1] == "padding" else feeds)
                times[key].append((time.perf_counter() - start) * 1e3)
        for mask in ("causal", "padding"):
            g, m = (statistics.median(times[kind, mask]) for kind in ("gqa", "mha"))
            print(f"| {mask} | {seq} | {g:.1f} | {m:.1f} | {m / g:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
