"""The fully-masked-row contract survives every attention lowering, and validate tries it.

variants.md: masked logits are *replaced* by the finite NEG (softmax in fp32), so a query row
with no allowed key -- a sequence that is all padding, or under causality the positions before
a left-padded sequence's first real token -- is uniform over all keys, never NaN and never the
softmax of the unmasked logits. Fused kernels treat such rows their own way (ORT's
MultiHeadAttention adds its mask_filter_value or, in causal mode, spreads the row over the
causal keys only; Attention-23 with a boolean mask gives zeros), so the lowering pass must keep
the contract itself, for every target and precision; and validate's random inputs must hold
such rows, or a broken lowering passes (issue 11, item 5)."""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from plain_dcmha import run_ort

import attn2onnx
from attn2onnx import cli
from attn2onnx.exporter import to_onnx
from attn2onnx.io_spec import InputSpec, random_inputs
from attn2onnx.passes import lower_attention, optimize, optimize_model
from attn2onnx.passes._ir_utils import count_ops
from attn2onnx.sources import from_module
from attn2onnx.variants import build_attention

D, N = 32, 4
SHAPES = [(5, 7), (5, 16)]  # two dynamic shapes, one odd length
TARGETS = ["ort", "ort-mha", "trt", "portable"]  # ort-mha: ort with native attention off (stock ONNX Runtime)
FUSED = {"ort": "com.microsoft::MultiHeadAttention", "trt": "Attention", "portable": "Attention"}
NATIVE = "ai.attn2onnx::StandardAttention"  # ort's default for plain cores (passes/native_attention_table.json)
POOLED = ("bn", "sh", "bn-sh")  # PooledNormAttention lowers to MultiHeadAttention either way
# every variant the pass lowers, causal where it can be: (variant, causal, fused nodes)
LOWERED = [
    ("mha", True, 1),
    ("mha", False, 1),
    ("optimised", True, 1),
    ("optimised", False, 1),
    ("efficient", True, 1),
    ("efficient", False, 1),
    ("super", True, 1),
    ("super", False, 1),
    ("bn", False, 1),
    ("sh", False, 2),
    ("bn-sh", False, 2),
]
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}


def contract_mask(batch: int, seq: int) -> np.ndarray:
    """Rows: all real; all padded; left-padded (causal rows before its first real token see no
    key); right-padded; padded on both sides."""
    mask = np.ones((batch, seq), dtype=bool)
    mask[1] = False
    mask[2, : seq // 2] = False
    mask[3, seq - 2 :] = False
    mask[4, :2] = mask[4, seq - 2 :] = False
    return mask


@pytest.fixture(scope="module")
def exported():
    """(fp32 module, its export at ``precision``), built once per (variant, causal, precision)."""
    cache: dict = {}

    def get(name: str, causal: bool, precision: str = "fp32"):
        key = (name, causal, precision)
        if key not in cache:
            torch.manual_seed(0)
            module = build_attention(name, d_model=D, n_heads=N, causal=causal, max_len=32).eval()
            with torch.no_grad():  # non-trivial WA for super (a fresh one is the identity)
                if hasattr(module, "wa"):
                    module.wa.add_(0.1 * torch.randn_like(module.wa))
            half = precision == "fp16"
            specs = [
                InputSpec("x", ("batch", "seq", D), "float", precision=precision),
                InputSpec("key_padding_mask", ("batch", "seq"), "mask"),
            ]
            x = torch.randn(2, 8, D)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                graph = to_onnx(
                    copy.deepcopy(module).half() if half else module,
                    (x.half() if half else x, torch.ones(2, 8, dtype=torch.bool)),
                    specs,
                    output_names=["y"],
                )
            cache[key] = (module, graph)
        return cache[key]

    return get


def optimise(stock: onnx.ModelProto, target: str) -> onnx.ModelProto:
    """``stock`` through the pipeline of ``target`` (ort-mha: ort with ``native`` off)."""
    return optimize_model(stock, target=target.removesuffix("-mha"), native=not target.endswith("-mha"))[0]


def fused_op(target: str, name: str) -> str:
    """The op a lowered core of variant ``name`` becomes on ``target``."""
    return NATIVE if target == "ort" and name not in POOLED else FUSED[target.removesuffix("-mha")]


def check_contract(module: torch.nn.Module, graph: onnx.ModelProto, precision: str) -> None:
    """The graph equals the fp32 PyTorch module on :func:`contract_mask` inputs at SHAPES."""
    for i, (batch, seq) in enumerate(SHAPES):
        dtype = np.float16 if precision == "fp16" else np.float32
        x = np.random.default_rng(i).standard_normal((batch, seq, D)).astype(dtype)
        mask = contract_mask(batch, seq)
        with torch.no_grad():
            expected = module(torch.from_numpy(x).float(), torch.from_numpy(mask)).numpy()
        assert np.isfinite(expected).all()
        got = run_ort(graph, {"x": x, "key_padding_mask": mask}).astype(np.float32)
        tol = TOLERANCE[precision]
        np.testing.assert_allclose(got, expected, atol=tol, rtol=tol, err_msg=f"shape {batch}x{seq}")


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name,causal,fused", LOWERED)
def test_lowering_keeps_fully_masked_rows(exported, name, causal, fused, target):
    module, stock = exported(name, causal)
    optimised = optimise(stock, target)
    assert count_ops(ir.serde.deserialize_model(optimised)).get(fused_op(target, name)) == fused
    check_contract(module, optimised, "fp32")


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize(
    "name,causal,fused", [("mha", True, None), ("mha", False, None), ("bn", False, 1), ("sh", False, 2)]
)
def test_fp16_lowering_keeps_fully_masked_rows(exported, name, causal, fused, target):
    """fp16 graphs, where NEG = -1e30 is not representable: whatever the pass lowers (today the
    pooled variants; mha's fp16 export computes its softmax in fp32 between casts, a core the pass
    does not match) still keeps the contract."""
    module, stock = exported(name, causal, "fp16")
    optimised = optimise(stock, target)
    if fused is not None:
        assert count_ops(ir.serde.deserialize_model(optimised)).get(fused_op(target, name)) == fused
    check_contract(module, optimised, "fp16")


def test_random_inputs_draw_padding_patterns():
    """Row 0 all real, row 1 left-padded (and right-padded when long enough), row 2 all padded;
    export's pad=False traces one unpadded path."""
    specs = [InputSpec("ids", ("batch", "seq"), "ids", 7), InputSpec("key_padding_mask", ("batch", "seq"), "mask")]
    for seed, (batch, seq) in enumerate([(3, 2), (3, 5), (6, 33)]):
        mask = random_inputs(specs, batch, seq, seed=seed)["key_padding_mask"]
        assert mask[0].all() and not mask[1, 0] and mask[1].any() and not mask[2].any()
        if seq > 2:
            assert not mask[1, -1]
        assert random_inputs(specs, batch, seq, seed=seed, pad=False)["key_padding_mask"].all()


@pytest.fixture(scope="module")
def layer_model(tmp_path_factory):
    """A bare mha layer: its checkpoint and its (unoptimised) export."""
    folder = tmp_path_factory.mktemp("contract")
    model = attn2onnx.build_model(attn2onnx.ModelConfig(family="layer", variant="mha", d_model=D, heads=N, max_len=64))
    attn2onnx.save(model, folder / "layer.pt")
    source = from_module(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attn2onnx.export(
            model,
            source.example_inputs(2, 16),
            folder / "layer.onnx",
            specs=source.specs,
            output_names=source.output_names,
            max_seq=source.max_seq,
        )
    return folder


def validate(capsys, onnx_path, checkpoint) -> tuple[int, dict]:
    status = cli.main(["validate", str(onnx_path), "--reference", str(checkpoint), "--json"])
    return status, json.loads(capsys.readouterr().out)


def test_validate_fails_a_lowering_that_breaks_the_contract(layer_model, monkeypatch, capsys):
    """The pre-fix lowering -- the key padding mask added with mask_filter_value=-10000, fully
    padded rows unguarded -- agrees with PyTorch on every row that has a real key, so only a
    fully padded row exposes it: validate must fail it, and pass the real lowering."""
    bad, good = layer_model / "bad.onnx", layer_model / "good.onnx"
    with monkeypatch.context() as patch:
        patch.setattr(lower_attention, "guard_empty_rows", lambda b, q, allowed: (q, allowed))
        patch.setattr(lower_attention, "NEG", -10000.0)
        optimize(layer_model / "layer.onnx", bad, target="ort", native=False)
    mha = next(n for n in onnx.load(bad).graph.node if n.op_type == "MultiHeadAttention")
    assert onnx.helper.get_attribute_value(next(a for a in mha.attribute if a.name == "mask_filter_value")) == -10000.0
    status, result = validate(capsys, bad, layer_model / "layer.pt")
    assert status == 1 and not result["passed"], result
    optimize(layer_model / "layer.onnx", good, target="ort")
    status, result = validate(capsys, good, layer_model / "layer.pt")
    assert status == 0 and result["passed"], result


def test_export_check_of_an_optimised_causal_lm(tmp_path, capsys):
    """export's own check (left-padded and fully padded rows at batch + 1) passes an optimised
    causal LM, whose causal rows before the first real token have no key."""
    model = attn2onnx.build_model(attn2onnx.ModelConfig(family="lm", variant="mha", d_model=D, heads=N, max_len=64))
    attn2onnx.save(model, tmp_path / "lm.pt")
    status = cli.main(
        [
            "export",
            str(tmp_path / "lm.pt"),
            "-o",
            str(tmp_path / "lm.onnx"),
            "--optimize",
            "--target",
            "ort",
            "--batch",
            "2",
            "--seq-len",
            "12",
        ]
    )
    out = capsys.readouterr().out
    assert status == 0 and out.count(" ok") == 2, out
