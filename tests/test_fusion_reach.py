"""Fusion reach on Hugging Face architectures (issue 20 item 4): the attention cores of tiny
random-weight transformers models (tests/hf_configs.py) fuse on target ort into the op that
computes them -- grouped / multi-query attention with a padding mask into GroupQueryAttention,
BLOOM's ALiBi on folded heads, T5's relative position bias beside the padding mask, Gemma 2's
tanh soft-capping -- with parity against the transformers model at dynamic batch and sequence
on padded batches (attn2onnx.validate.check_parity: left / right padding, fp32 tolerances), and
``optimize --explain`` names a reason wherever a core stays unfused.
"""

from __future__ import annotations

import corpus
import onnx
import onnx_ir as ir
import pytest

from attn2onnx.exporter import export
from attn2onnx.passes import optimize_model
from attn2onnx.passes._ir_utils import count_ops
from attn2onnx.passes.explain import explain
from attn2onnx.sources import transformers_folder_source
from attn2onnx.validate import check_parity
from hf_configs import save_tiny

pytest.importorskip("transformers")

MHA = "com.microsoft::MultiHeadAttention"
GQA = "com.microsoft::GroupQueryAttention"
FUSED = (MHA, GQA, "Attention")

# (architecture, attention implementation) -> the fused op every attention core becomes on target ort
# with native attention off (com.microsoft's forms, for stock ONNX Runtime)
CASES = {
    ("llama", "eager"): GQA,  # grouped K/V, causal + padding as one additive mask
    ("llama", "sdpa"): GQA,  # ONNX Attention-23 with a boolean causal + padding mask
    ("gemma", "eager"): GQA,  # multi-query (one K/V head)
    ("bloom", "eager"): MHA,  # folded heads viewed as [B,H,T,S] for the mask, ALiBi added by baddbmm
    ("t5_encoder", "eager"): MHA,  # relative position bias [1,H,T,S] plus the padding mask: two Adds
    ("gemma2", "eager"): GQA,  # tanh soft-capping: GroupQueryAttention's softcap
}


@pytest.fixture(scope="module")
def stock(tmp_path_factory):
    """(architecture, implementation) -> (source, stock export path), each exported once."""
    made: dict = {}

    def get(name: str, impl: str):
        if (name, impl) not in made:
            work = tmp_path_factory.mktemp(f"{name}_{impl}")
            folder = save_tiny(name, work / name) if not (work / name).exists() else work / name
            source = transformers_folder_source(folder, attn_implementation=impl)
            path = work / "stock.onnx"
            export(
                source.module,
                source.example_inputs(2, 16),
                path,
                specs=source.specs,
                output_names=source.output_names,
                max_seq=source.max_seq,
            )
            made[name, impl] = source, path
        return made[name, impl]

    return get


@pytest.mark.parametrize("name,impl", list(CASES), ids=lambda x: x)
def test_hf_cores_fuse_with_parity_on_padded_batches(stock, name, impl, tmp_path):
    source, path = stock(name, impl)
    before = count_ops(ir.load(str(path)))
    cores = before.get("Softmax", 0) + before.get("Attention", 0)
    optimised, _ = optimize_model(onnx.load(str(path)), target="ort", native=False)
    ops = count_ops(ir.serde.deserialize_model(optimised))
    assert ops.get(CASES[name, impl]) == cores and "Softmax" not in ops, ops
    out = tmp_path / "ort.onnx"
    onnx.save(optimised, out)
    report = check_parity(out, source)
    assert report.passed, [(c.shape, c.max_abs_err) for c in report.comparisons]
    assert any("padding mask" in line for line in report.inputs)
    outcomes = explain(onnx.load(str(path)), target="ort", native=False)
    assert len(outcomes) == cores and all(outcome.fused for outcome in outcomes), outcomes


def test_soft_capping_is_group_query_attentions_softcap(stock):
    """Gemma 2's attn_logit_softcapping becomes the fused op's softcap attribute (the tiny model's
    logits are too small for the tanh to matter: the corpus entry gemma2_soft_cap checks the values)."""
    source, path = stock("gemma2", "eager")
    optimised, _ = optimize_model(onnx.load(str(path)), target="ort")
    nodes = [n for n in optimised.graph.node if n.op_type == "GroupQueryAttention"]
    softcap = source.module.model.config.attn_logit_softcapping
    assert nodes and all(onnx.helper.get_node_attr_value(n, "softcap") == softcap for n in nodes)


TORCH_ONNX = [e for e in corpus.ENTRIES if e.exporter and not e.gap]


@pytest.mark.parametrize("entry", TORCH_ONNX, ids=lambda e: e.name)
def test_torch_onnx_sdpa_exports_fuse_by_this_projects_rules(entry):
    """F.scaled_dot_product_attention exported by the user's own torch.onnx.export (dynamo at
    opset 18: the scale split as sqrt on q and k, the mask added as Where(mask, 0, -inf), NaN rows
    zeroed; TorchScript at opset 17: no shapes in the file) fuses in fuse_standard_attention,
    not only in the onnxscript stage after it (the corpus checks its parity)."""
    stock = corpus.export(entry, corpus.build(entry))
    _, report = optimize_model(stock, target="ort")
    ours = {p["pass"]: p["fused"] for p in report.passes}["fuse_standard_attention"]
    op = "StandardAttention" if entry.native else "MultiHeadAttention"  # ort's default (corpus.Entry.native)
    assert ours.get(f"{op} (standard)") == entry.cores, report.passes
