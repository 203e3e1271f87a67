"""The fused DCMHA Triton kernel against float64 references, on the CPU under Triton's
interpreter (small shapes: numerics, masks, odd sizes, head groups; timing needs a GPU).

Triton picks interpreter or compiler when a kernel is *decorated*, so the kernel must be
imported with TRITON_INTERPRET=1 already set: the cases run in one subprocess (this file with
``--worker``) and the tests here check what it measured. bf16 is not checked here: the
interpreter's bf16 tl.dot is broken (huge errors even for a plain 4x4 dot); benchmarks/gpu.py
checks bf16 on a GPU.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import skip_or_fail

ROOT = Path(__file__).resolve().parents[1]

# id -> case. Sizes stay tiny: the interpreter runs numpy per program.
CASES: dict[str, dict] = {
    "plain": dict(B=1, T=5, S=5, N=2, d=8),
    "padding_T_ne_S_mix": dict(B=2, T=7, S=11, N=3, d=12, causal=True, mix=True),
    "causal_window_multi_block": dict(B=1, T=40, S=40, N=2, d=8, causal=True, window=7),
    "window_T_lt_S": dict(B=1, T=9, S=35, N=2, d=8, causal=True, window=5, pad=False),
    "decode_T1": dict(B=2, T=1, S=33, N=3, d=8, causal=True, mix=True),
    "decode_T1_window": dict(B=1, T=1, S=33, N=3, d=8, causal=True, window=4),
    "T_gt_S_empty_rows": dict(B=1, T=20, S=9, N=2, d=8, causal=True),
    "left_padding_empty_rows": dict(B=2, T=33, S=33, N=4, d=20, causal=True, left_pad=20),
    "all_keys_padded": dict(B=1, T=6, S=6, N=2, d=8, all_pad=True, mix=True),
    "static_mix_dot_path": dict(B=1, T=9, S=9, N=16, d=16, mix=True),
    "head_groups_2": dict(B=1, T=17, S=23, N=4, d=8, causal=True, mix=True, heads_per_program=2),
    "head_groups_4": dict(B=1, T=17, S=23, N=4, d=8, causal=True, heads_per_program=1),
    "d_chunks_odd_d": dict(B=1, T=10, S=10, N=2, d=40, causal=True, block_dk=16),
    "rank1_scale": dict(B=1, T=12, S=30, N=2, d=8, R=1, scale=0.5),
    "fp16": dict(B=1, T=12, S=12, N=2, d=8, dtype="float16"),
    "fp16_causal_mix": dict(B=1, T=13, S=13, N=4, d=16, causal=True, mix=True, dtype="float16"),
}
TOLERANCE = {"float32": 2e-5, "float16": 2e-2}


def contract_reference(
    q, k, v, q_factors, k_factors, key_padding_mask, static_mix, scale, causal, window, use_static_mix
):
    """DcmhaAttention of docs/ops.md in float64, written out independently."""
    q, k, v, qf, kf, wb = (t.double() for t in (q, k, v, q_factors, k_factors, static_mix))
    B, T, N, d = q.shape
    S = k.shape[1]
    R = (qf.shape[3] - 1) // 2
    scale = scale or 1.0 / math.sqrt(d)

    def compose(a, fq, fk, w):  # a [B,N,T,S]; fq [B,T,2R+1,N]; fk [B,S,2R+1,N]
        uq, vq, gq = fq[:, :, :R], fq[:, :, R : 2 * R], fq[:, :, 2 * R]
        uk, vk, gk = fk[:, :, :R], fk[:, :, R : 2 * R], fk[:, :, 2 * R]
        out = a + a * gq.transpose(1, 2)[:, :, :, None] + a * gk.transpose(1, 2)[:, :, None, :]
        out = out + torch.einsum("btsr,btrn->bnts", torch.einsum("bnts,btrn->btsr", a, uq), vq)
        out = out + torch.einsum("btsr,bsrn->bnts", torch.einsum("bnts,bsrn->btsr", a, uk), vk)
        if use_static_mix:
            out = out + torch.einsum("bhts,hn->bnts", a, w)
        return out

    logits = compose(torch.einsum("btnd,bsnd->bnts", q, k) * scale, qf[:, :, 0], kf[:, :, 0], wb[0])
    t_abs = torch.arange(T)[:, None] + (S - T)
    s = torch.arange(S)[None, :]
    allowed = key_padding_mask[:, None, None, :].clone()
    if causal:
        allowed = allowed & (s <= t_abs)
    if window:
        allowed = allowed & (t_abs - s < window)
    probs = torch.softmax(torch.where(allowed, logits, torch.tensor(-1e30, dtype=torch.float64)), dim=-1)
    probs = compose(probs, qf[:, :, 1], kf[:, :, 1], wb[1])
    return torch.einsum("bnts,bsnd->btnd", probs, v)


def make_inputs(case: dict, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    B, T, S, N, d, R = case["B"], case["T"], case["S"], case["N"], case["d"], case.get("R", 2)
    dtype = getattr(torch, case.get("dtype", "float32"))

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    q, k, v = rnd(B, T, N, d), rnd(B, S, N, d), rnd(B, S, N, d)
    qf, kf = rnd(B, T, 2, 2 * R + 1, N, scale=0.3), rnd(B, S, 2, 2 * R + 1, N, scale=0.3)
    if case.get("pad", True):
        mask = torch.rand(B, S, generator=g) > 0.25
    else:
        mask = torch.ones(B, S, dtype=torch.bool)
    if case.get("left_pad"):
        mask[:] = True
        mask[0, : case["left_pad"]] = False
    if case.get("all_pad"):
        mask[:] = False
    wb = rnd(2, N, N, scale=0.2)
    return [q, k, v, qf, kf, mask, wb]


def attrs(case: dict) -> tuple:
    return (case.get("scale", 0.0), case.get("causal", False), case.get("window", 0), case.get("mix", False))


def run_worker(out_path: str) -> None:
    """Runs in the TRITON_INTERPRET=1 subprocess: every case, errors to JSON."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from attn2onnx.custom_ops.dcmha_attention.triton_kernel import dcmha_attention_triton

    import attn2onnx.custom_ops.torch_ops  # noqa: F401  (registers torch.ops.attn2onnx.*)

    op = torch.ops.attn2onnx.dcmha_attention
    results = {}
    for name, case in CASES.items():
        inputs = make_inputs(case)
        overrides = {key: case[key] for key in ("heads_per_program", "block_dk") if key in case}
        out = dcmha_attention_triton(*inputs, *attrs(case), **overrides)
        expected = contract_reference(*inputs, *attrs(case))
        result = {
            "err": (out.double() - expected).abs().max().item(),
            "dtype": str(out.dtype),
            "shape_ok": tuple(out.shape) == tuple(inputs[0].shape),
            "finite": bool(torch.isfinite(out).all()),
        }
        as64 = [t.double() if t.is_floating_point() else t for t in inputs]
        real = op(*as64, *attrs(case))
        result["err_vs_op"] = (out.double() - real).abs().max().item()
        result["contract_vs_op"] = (expected - real).abs().max().item()
        results[name] = result
    Path(out_path).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("triton_interp") / "results.json"
    env = dict(os.environ, TRITON_INTERPRET="1", TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_float64_contract(measured, name):
    case, result = CASES[name], measured[name]
    assert result["shape_ok"] and result["finite"]
    assert result["dtype"] == f"torch.{case.get('dtype', 'float32')}"
    assert result["err"] < TOLERANCE[case.get("dtype", "float32")], result


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_torch_op_reference(measured, name):
    result = measured[name]
    assert result["contract_vs_op"] < 1e-9, result  # the two references agree
    assert result["err_vs_op"] < TOLERANCE[CASES[name].get("dtype", "float32")], result


def test_gpu_benchmark_tiny_interpret_mode():
    """benchmarks/gpu.py --tiny --interpret: correctness pass and table on the CPU."""
    if importlib.util.find_spec("triton") is None:
        skip_or_fail("triton is not installed")
    env = dict(os.environ, TRITON_DEFAULT_FP_FUSION="1")
    env.pop("TRITON_INTERPRET", None)  # the script sets it itself
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu.py"),
            "--tiny",
            "--interpret",
            "--batches",
            "1",
            "2",
            "--lengths",
            "16",
            "--reps",
            "1",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert out.count("PASS") == 4 and "FAIL" not in out
    table = out[out.index("DCMHA attention core") :].splitlines()
    assert "fused ms" in table[1] and "eager ms" in table[1] and "sdpa ms" in table[1]
    assert len(table) == 3 + 4  # title, header, rule, one row per (d, B) at T = 16
    assert all("error" not in line for line in table)


def test_config_heuristics():
    if importlib.util.find_spec("triton") is None:
        skip_or_fail("triton is not installed")
    from attn2onnx.custom_ops.dcmha_attention.triton_kernel import config_for, default_heads_per_program

    assert default_heads_per_program(4, 16, 16) == 4  # small: one group, all heads
    assert default_heads_per_program(32, 128, 16) == 8  # published: 4 groups of 8
    cfg = config_for(32, 80, 2, "bfloat16", 0.0, True, 256, False)
    assert cfg.block_h == 32 and cfg.block_d == 128 and cfg.head_groups == 4 and cfg.num_warps == 8
    assert math.isclose(cfg.scale, 1 / math.sqrt(80)) and cfg.dot_precision == "tf32"
    assert cfg.grid(3, 1000) == (63, 3, 4)
    with pytest.raises(ValueError, match="causal"):
        config_for(4, 16, 2, "float32", 0.0, False, 8, False)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        run_worker(sys.argv[2])
    else:
        sys.exit(pytest.main([__file__, "-q"]))
