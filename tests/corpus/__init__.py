"""The attention corpus: standard attention in the styles of public code, each with the fusion
the ``ort`` pipeline is expected to give it, and near misses that must stay unfused.

``ENTRIES`` lists :class:`Entry` rows; ``inputs(entry, batch, seq)`` draws the inputs (the key
padding mask holds, by row, all real / right-padded / left-padded / all padded tokens; True = real,
or True = pad for the entries whose module takes it so).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from . import near_misses as nm
from . import styles as st

MHA = "com.microsoft::MultiHeadAttention"
GQA = "com.microsoft::GroupQueryAttention"


@dataclass(frozen=True)
class Entry:
    name: str
    make: Callable[[], torch.nn.Module]
    mask: bool  # takes a key_padding_mask input
    expected: str | None  # fused op on target ort with native attention off; None: a near miss, must not fuse
    precision: str = "fp32"  # export precision (fp16: module.half())
    cores: int = 1  # attention cores in the module (per-head loops: one per head)
    fused: int = 0  # fused ops expected where not one per core (a head loop batched by normalize_hosseini: 1)
    gap: str = ""  # a standard core the rules do not fuse yet: why (explain says it too)
    portable_gap: str = ""  # the same on targets trt / portable only
    pads: bool = False  # its key_padding_mask is True = pad (fed negated)
    exporter: str = ""  # "": attn2onnx's export; "opset18": torch.onnx dynamo at opset 18; "torchscript": dynamo=False
    native: bool = False  # ort's default puts it on ai.attn2onnx::StandardAttention (`expected`: with native off)


BELOW_23 = "a model below opset 23 has no ONNX Attention to fuse into"

ENTRIES: list[Entry] = [
    Entry("nanogpt_causal", st.NanoGptCausal, False, MHA, native=True),
    Entry(
        "gpt2_hf_causal_padding",
        st.Gpt2HfCausal,
        True,
        MHA,
        portable_gap="an additive padding mask with causality: ORT's Attention-23 differs from PyTorch on empty rows",
    ),
    Entry("timm_vit", st.TimmVit, False, MHA),
    Entry("timm_vit_sdpa", st.TimmVitFused, False, MHA, native=True),
    Entry("bert_additive", st.BertAdditive, True, MHA),
    Entry("llama_rope_sdpa", st.LlamaRopeSdpa, False, MHA, native=True),
    Entry("llama_eager", st.LlamaEager, False, MHA, native=True),
    Entry("sdpa_causal", st.SdpaCausal, False, MHA, native=True),
    Entry("sdpa_bool_mask", st.SdpaBoolMask, True, MHA, native=True),
    Entry("torch_mha_padding", st.TorchMhaPadding, True, MHA),
    Entry("torch_mha_causal", st.TorchMhaCausal, False, MHA, native=True),
    Entry("per_head_loop", st.PerHeadLoop, False, MHA, cores=st.H, fused=1, native=True),
    Entry("einsum", st.Einsum, False, MHA),
    Entry("einsum_heads_last", st.EinsumHeadsLast, False, MHA),
    Entry("einsum_heads_folded", st.EinsumHeadsFolded, False, MHA),
    Entry("einsum_ellipsis", st.EinsumEllipsis, False, MHA),
    Entry("einsum_ellipsis_causal", st.EinsumEllipsisCausal, False, MHA, native=True),
    Entry("scale_on_q", st.ScaleOnQ, False, MHA, native=True),
    Entry("scale_on_k_div", st.ScaleOnK, False, MHA, native=True),
    Entry("scale_split_q_k", st.SqrtScaleBoth, False, MHA),
    Entry("where_allowed", st.WhereAllowed, True, MHA, native=True),
    Entry("masked_fill_padding", st.MaskedFillPadding, True, MHA, native=True),
    Entry("causal_and_padding", st.CausalAndPadding, True, MHA, native=True),
    Entry("dropout_eval", st.DropoutEval, False, MHA, native=True),
    Entry("softmax_fp32_casts_fp16", st.SoftmaxFp32Casts, False, MHA, precision="fp16", native=True),
    Entry("timm_vit_fp16", st.TimmVit, False, MHA, precision="fp16"),
    Entry("gqa_repeat_kv_eager", st.GqaRepeatKvEager, False, GQA, native=True),
    Entry("gqa_repeat_interleave_sdpa", st.GqaRepeatInterleaveSdpa, False, GQA, native=True),
    Entry("gqa_sdpa_enable_gqa", st.GqaSdpaEnable, False, GQA, native=True),
    Entry("gqa_padding_repeat_kv", st.GqaPaddingRepeatKv, True, GQA, native=True),
    Entry("gqa_hf_causal_padding", st.GqaHfCausalPadding, True, GQA, native=True),
    Entry("gqa_causal_padding_masked_fill", st.GqaCausalPaddingMaskedFill, True, GQA, native=True),
    Entry("gqa_sdpa_padding", st.GqaSdpaPadding, True, GQA, native=True),
    Entry("gqa_tiled_causal", st.GqaTiledCausal, False, MHA, native=True),
    Entry("multi_query_broadcast", st.MultiQueryBroadcast, False, GQA),
    Entry("soft_causal_penalty", nm.SoftCausalPenalty, False, MHA),  # fuses, but as a bias
    Entry("fairseq_encoder_padding", st.FairseqEncoderPadding, True, MHA, native=True),
    Entry("fairseq_decoder_causal", st.FairseqDecoderCausal, False, MHA, native=True),
    Entry("fairseq_decoder_causal_padding", st.FairseqDecoderCausalPadding, True, MHA, native=True),
    Entry("bmm_causal_bias", st.BmmCausalBias, False, MHA, native=True),
    Entry("bmm_tril_masked_fill", st.BmmTrilMaskedFill, False, MHA, native=True),
    Entry("bmm_alibi_padding", st.BmmAlibiPadding, True, MHA),  # fuses, the per-row ALiBi as a bias
    Entry("bloom_view_alibi", st.BloomViewAlibi, True, MHA),
    Entry("t5_relative_bias_padding", st.T5RelativeBiasPadding, True, MHA),
    Entry("gemma2_soft_cap", st.Gemma2SoftCap, True, GQA),
    Entry("sdpa_causal_opset18", st.SdpaCausal, False, MHA, portable_gap=BELOW_23, exporter="opset18"),
    Entry("sdpa_bool_mask_opset18", st.SdpaBoolMask, True, MHA, portable_gap=BELOW_23, exporter="opset18", native=True),
    Entry("sdpa_causal_torchscript", st.SdpaCausal, False, MHA, portable_gap=BELOW_23, exporter="torchscript"),
    Entry(
        "sdpa_bool_mask_torchscript",
        st.SdpaBoolMask,
        True,
        MHA,
        gap="opset 17: the padding mask's empty-row guard needs ReduceMax with axes as an input (opset 18)",
        exporter="torchscript",
    ),
    Entry(
        "gqa_sdpa_padding_opset18", st.GqaSdpaPadding, True, GQA, portable_gap=BELOW_23, exporter="opset18", native=True
    ),
    Entry("masked_fill_pad_true", st.MaskedFillPadTrue, True, MHA, pads=True, native=True),
    Entry("torch_mha_pad_true", st.TorchMhaPadTrue, True, MHA, pads=True),
    Entry("fairseq_encoder_pad_true", st.FairseqEncoderPadTrue, True, MHA, pads=True, native=True),
    Entry("triu_masked_fill", st.TriuMaskedFill, False, MHA, native=True),
    Entry("pad_true_then_triu", st.PadTrueThenTriu, True, MHA, pads=True, native=True),
    Entry("near_softmax_over_queries", nm.SoftmaxOverQueries, False, None),
    Entry("near_fill_with_zero", nm.FillWithZero, True, None),
    Entry("near_mix_over_queries", nm.MixOverQueries, False, None),
    Entry("near_logits_over_tokens", nm.LogitsOverTokens, False, None),
    Entry("near_scaled_after_softmax", nm.ScaledAfterSoftmax, False, None),
    Entry("near_einsum_mix_over_queries", nm.EinsumMixOverQueries, False, None),
    Entry("near_folded_per_head_window", nm.FoldedPerHeadWindow, False, None),
]


def padding_mask(batch: int, seq: int) -> np.ndarray:
    """Row i: (i mod 4) all real, right-padded, left-padded, all padded."""
    mask = np.ones((batch, seq), dtype=bool)
    for i in range(batch):
        kind = i % 4
        if kind == 1:
            mask[i, seq - seq // 3 :] = False
        elif kind == 2:
            mask[i, : seq // 2] = False
        elif kind == 3:
            mask[i] = False
    return mask


def inputs(entry: Entry, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    dtype = np.float16 if entry.precision == "fp16" else np.float32
    feeds = {"x": rng.standard_normal((batch, seq, st.D)).astype(dtype)}
    if entry.mask:
        mask = padding_mask(batch, seq)
        feeds["key_padding_mask"] = ~mask if entry.pads else mask
    return feeds


def build(entry: Entry) -> torch.nn.Module:
    """The entry's module, seeded, in eval mode, fp32 (the reference)."""
    torch.manual_seed(0)
    return entry.make().eval()


def export(entry: Entry, module: torch.nn.Module):
    """The stock export (dynamic batch and seq) of ``module`` at the entry's precision."""
    import copy
    import warnings

    from attn2onnx.exporter import to_onnx
    from attn2onnx.io_spec import InputSpec

    half = entry.precision == "fp16"
    specs = [InputSpec("x", ("batch", "seq", st.D), "float", precision=entry.precision)]
    x = torch.randn(2, 8, st.D)
    args: list[torch.Tensor] = [x.half() if half else x]
    if entry.mask:
        specs.append(InputSpec("key_padding_mask", ("batch", "seq"), "mask"))
        args.append(torch.ones(2, 8, dtype=torch.bool))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if entry.exporter:
            return torch_onnx_export(entry, module, args)
        return to_onnx(copy.deepcopy(module).half() if half else module, args, specs, output_names=["y"])


def torch_onnx_export(entry: Entry, module: torch.nn.Module, args: list[torch.Tensor]):
    """What a user's own ``torch.onnx.export`` gives (dynamic batch and seq, fp32): the dynamo
    exporter at opset 18 (SDPA decomposed by torchlib: the scale split as sqrt on q and k, a
    boolean mask added as Where(mask, 0, -inf), NaN rows zeroed) or the TorchScript exporter
    (``dynamo=False``, opset 17: no shapes in the file)."""
    import contextlib
    import io

    import onnx

    names = ["x", "key_padding_mask"][: len(args)]
    with contextlib.redirect_stdout(io.StringIO()):
        if entry.exporter == "opset18":
            dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq", max=st.MAX_LEN)}
            program = torch.onnx.export(
                module,
                tuple(args),
                dynamo=True,
                opset_version=18,
                input_names=names,
                output_names=["y"],
                dynamic_shapes=tuple(dims for _ in args),
            )
            return program.model_proto
        buffer = io.BytesIO()
        torch.onnx.export(
            module,
            tuple(args),
            buffer,
            dynamo=False,
            opset_version=17,
            input_names=names,
            output_names=["y"],
            dynamic_axes={name: {0: "batch", 1: "seq"} for name in names},
        )
    return onnx.load_from_string(buffer.getvalue())
