"""Plain attention lowered onto ai.attn2onnx::StandardAttention for target ort (issue 25 items 2-3,
passes/native_attention.py): the mask reaches the op as its causal mode and the graph's [B,S]
key mask -- no [B,1,T,S] tensor, no row guard -- the choice follows the benchmark's table per
shape class, and the optimised graph (``optimize --target ort``) keeps the outputs of the stock
export and of PyTorch, fully padded rows included, with the native kernel registered.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from attn2onnx.cli import main
from attn2onnx.exporter import to_onnx
from attn2onnx.io_spec import InputSpec
from attn2onnx.passes import native_attention, optimize_model
from attn2onnx.passes._ir_utils import count_ops
from attn2onnx.runtime import native, session
from attn2onnx.variants import build_attention

D, N = 32, 4
FASTER = {"classes": {f"{m}/d8": {"T": [256, 1024], "ratio": [0.5, 0.5]} for m in ("causal", "padded")}}
SLOWER = {"classes": {f"{m}/d8": {"T": [256, 1024], "ratio": [1.5, 1.5]} for m in ("causal", "padded")}}
# Ops that build a [B,1,T,S] mask or guard empty rows around MultiHeadAttention.
MASK_BUILDERS = ("Trilu", "ReduceMax", "Where", "com.microsoft::MultiHeadAttention")


@pytest.fixture
def table(monkeypatch):
    """The table given by the test (the checked-in one changes with each benchmark run); lowering is on by default."""

    def use(t: dict) -> None:
        monkeypatch.setattr(native_attention, "load_table", lambda: t)

    use(FASTER)
    return use


def export(name: str, causal: bool) -> tuple[torch.nn.Module, onnx.ModelProto]:
    torch.manual_seed(0)
    module = build_attention(name, d_model=D, n_heads=N, causal=causal, max_len=96).eval()
    specs = [InputSpec("x", ("batch", "seq", D), "float"), InputSpec("key_padding_mask", ("batch", "seq"), "mask")]
    example = (torch.randn(2, 8, D), torch.ones(2, 8, dtype=torch.bool))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return module, to_onnx(module, example, specs, output_names=["y"])


def feeds_for(batch: int, seq: int, seed: int) -> dict:
    """Right padding on the second row, every key padded on the last (uniform rows)."""
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), bool)
    mask[1, seq - 3 :] = False
    mask[-1] = False
    return {"x": rng.standard_normal((batch, seq, D)).astype(np.float32), "key_padding_mask": mask}


def check_parity(module, stock: onnx.ModelProto, optimised: onnx.ModelProto) -> None:
    if native.unavailable_reason() is not None:
        pytest.skip(f"native kernel library unavailable: {native.unavailable_reason()}")
    fast = session(optimised, native=True, threads=2)
    body = session(optimised, native=False, threads=1)
    reference = session(stock, native=False, threads=1)
    for i, (batch, seq) in enumerate([(3, 5), (3, 17), (4, 70)]):
        feeds = feeds_for(batch, seq, i)
        got = fast.run(None, feeds)[0]
        np.testing.assert_allclose(got, reference.run(None, feeds)[0], atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(got, body.run(None, feeds)[0], atol=1e-4, rtol=1e-4)
        with torch.no_grad():
            want = module(torch.from_numpy(feeds["x"]), torch.from_numpy(feeds["key_padding_mask"])).numpy()
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["mha", "optimised", "super"])
@pytest.mark.parametrize("causal", [True, False])
def test_lowered_onto_the_native_op_with_masks_as_modes(table, name, causal):
    module, stock = export(name, causal)
    optimised, report = optimize_model(stock, target="ort")
    lowered = next(p for p in report.passes if p["pass"] == "lower_attention")["fused"]
    assert lowered.get("StandardAttention") == 1 and not lowered.get("MultiHeadAttention"), lowered
    model = ir.serde.deserialize_model(optimised)
    counts = count_ops(model)
    assert counts.get("ai.attn2onnx::StandardAttention") == 1, counts
    assert not any(op in counts for op in MASK_BUILDERS), counts
    node = next(n for n in model.graph if n.op_type == "StandardAttention")
    assert node.attributes["causal"].value == int(causal)
    assert node.inputs[3].name == "key_padding_mask"  # the graph's own [B,S] mask, as it is
    check_parity(module, stock, optimised)


def test_slower_classes_keep_multi_head_attention(table):
    table(SLOWER)
    _, stock = export("mha", True)
    counts = count_ops(ir.serde.deserialize_model(optimize_model(stock, target="ort")[0]))
    assert "ai.attn2onnx::StandardAttention" not in counts and counts.get("com.microsoft::MultiHeadAttention") == 1


def test_off_with_native_false(table):
    _, stock = export("mha", False)
    counts = count_ops(ir.serde.deserialize_model(optimize_model(stock, target="ort", native=False)[0]))
    assert "ai.attn2onnx::StandardAttention" not in counts and counts.get("com.microsoft::MultiHeadAttention") == 1


def test_optimize_command_option_off_keeps_multi_head_attention(table, tmp_path):
    _, stock = export("mha", True)
    source, target = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(stock, source)
    assert main(["optimize", str(source), "-o", str(target), "--no-native-attention"]) == 0
    counts = count_ops(ir.load(str(target)))
    assert "ai.attn2onnx::StandardAttention" not in counts and counts.get("com.microsoft::MultiHeadAttention") == 1


def test_choice_by_nearest_class():
    table = {
        "classes": {
            "causal/d64": {"T": [256, 4096], "ratio": [1.2, 0.5]},
            "causal/d128": {"T": [256, 4096], "ratio": [0.9, 0.9]},
        }
    }
    parts = {"causal": 1}
    assert not native_attention.choose("ort", parts, None, 64, 300, True, table)  # nearest T: 256
    assert native_attention.choose("ort", parts, None, 64, 3000, True, table)
    assert native_attention.choose("ort", parts, None, 64, None, True, table)  # geometric mean 0.77
    assert native_attention.choose("ort", parts, None, 100, 300, True, table)  # nearest d: 128
    assert not native_attention.choose("ort", {"causal": 0}, None, 64, 300, True, table)  # no padded class
    assert not native_attention.choose("trt", parts, None, 64, 3000, True, table)
    assert not native_attention.choose("ort", parts, None, 64, 3000, False, table)


def test_optimize_command_writes_the_lowered_graph(table, tmp_path):
    module, stock = export("mha", True)
    source, target = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(stock, source)
    assert main(["optimize", str(source), "-o", str(target), "--target", "ort"]) == 0
    optimised = onnx.load(target)
    assert any(n.op_type == "StandardAttention" for n in optimised.graph.node)
    check_parity(module, stock, optimised)


@pytest.mark.parametrize(
    "name", ["gqa_repeat_kv_eager", "sdpa_bool_mask", "causal_and_padding", "masked_fill_pad_true"]
)
def test_standard_attention_fusion_uses_the_native_op(table, name):
    """Other tools' attention (tests/corpus) through fuse_standard_attention's hook: grouped K / V
    reach the op unrepeated (kv_num_heads), masks as modes, outputs as PyTorch's."""
    import corpus

    table({"classes": {f"{m}/d8": {"T": [256], "ratio": [0.5]} for m in ("causal", "padded")}})
    entry = next(e for e in corpus.ENTRIES if e.name == name)
    module = corpus.build(entry)
    graph = optimize_model(corpus.export(entry, module), target="ort")[0]
    model = ir.serde.deserialize_model(graph)
    (node,) = [n for n in model.graph if n.op_type == "StandardAttention"]
    assert node.attributes["kv_num_heads"].value == (2 if name.startswith("gqa") else 0)
    assert not {"Trilu", "com.microsoft::MultiHeadAttention"} & set(count_ops(model))  # SDPA's zero rows may stay
    if native.unavailable_reason() is not None:
        pytest.skip(f"native kernel library unavailable: {native.unavailable_reason()}")
    fast = session(graph, native=True, threads=2)
    for seed, (batch, seq) in enumerate([(4, 7), (3, 70)]):
        feeds = corpus.inputs(entry, batch, seq, seed)
        with torch.no_grad():
            want = module(*(torch.from_numpy(v) for v in feeds.values())).numpy()
        rows = np.isfinite(want).all(-1)
        np.testing.assert_allclose(fast.run(None, feeds)[0][rows], want[rows], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("flags, op", [((), "StandardAttention"), (("--no-native-attention",), "MultiHeadAttention")])
def test_export_optimize_takes_the_option(tmp_path, flags, op):
    """``export --optimize`` lowers onto StandardAttention by default, MultiHeadAttention with the option."""
    torch.manual_seed(0)
    module = build_attention("mha", d_model=D, n_heads=N, causal=True, max_len=96).eval()
    seq = torch.export.Dim("seq", max=96)
    program = torch.export.export(module, (torch.randn(2, 8, D),), dynamic_shapes=({1: seq},))
    torch.export.save(program, tmp_path / "m.pt2")
    out = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["export", str(tmp_path / "m.pt2"), "-o", str(out), "--optimize", "--no-check", *flags]) == 0
    assert sum(n.op_type == op for n in onnx.load(out).graph.node) == 1
