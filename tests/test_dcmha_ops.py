"""DCMHA (variants.md section 5): the DcmhaAttention / DcmhaCompose ops and the dcmha variant.

- op references against independent formulas (merged N x N compose, plain softmax attention);
- the standard-op function bodies run in ONNX Runtime against the references, at several dynamic
  shapes (padding, causal, window, static mix, T = 1, T != S with end-aligned causal);
- autograd through the ops (gradcheck, float64) and through the module (it trains);
- the module: zero dynamic weights == multi-head attention written here, cached decoding ==
  full forward row by row, export of the whole layer to ORT.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import attn2onnx.custom_ops as custom_ops
from attn2onnx.custom_ops import DOMAIN, OPSET_VERSION
from attn2onnx.custom_ops.dcmha_attention import dcmha_attention_reference
from attn2onnx.custom_ops.dcmha_compose import dcmha_compose_reference
from attn2onnx.variants import VariantError, build_attention, get_variant
from attn2onnx.variants.dcmha import DcmhaAttention, DcmhaConfig

N_HEADS, HEAD_DIM = 3, 4


# ----------------------------------------------------------------------------- helpers
def export_with_functions(module: torch.nn.Module, args: tuple, dynamic_shapes) -> onnx.ModelProto:
    """Export with the custom translation table, attach every op's function body (the lead's
    attn2onnx.export will do this; kept local until then) and check the result."""
    program = torch.onnx.export(
        module,
        args,
        dynamo=True,
        opset_version=23,
        custom_translation_table=custom_ops.translation_table(),
        dynamic_shapes=dynamic_shapes,
    )
    model = program.model_proto
    model.functions.extend(custom_ops.function_protos().values())
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, OPSET_VERSION))
    onnx.checker.check_model(model, full_check=True)
    return model


def ort_session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def run(session: ort.InferenceSession, *inputs: torch.Tensor) -> np.ndarray:
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
    return session.run(None, feeds)[0]


def random_padding(b: int, s: int, gen: torch.Generator) -> torch.Tensor:
    """Right padding: row i keeps at least one real token."""
    lengths = torch.randint(1, s + 1, (b,), generator=gen)
    lengths[0] = s
    return torch.arange(s)[None, :] < lengths[:, None]


def op_inputs(b, t, s, n=N_HEADS, d=HEAD_DIM, rank=2, seed=0, dtype=torch.float32, padded=True):
    """q, k, v, q_factors, k_factors, key_padding_mask, static_mix with mixing that matters."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, scale=1.0: (torch.randn(*shape, generator=gen) * scale).to(dtype)  # noqa: E731
    mask = random_padding(b, s, gen) if padded else torch.ones(b, s, dtype=torch.bool)
    return (
        rnd(b, t, n, d),
        rnd(b, s, n, d),
        rnd(b, s, n, d),
        rnd(b, t, 2, 2 * rank + 1, n, scale=0.4),
        rnd(b, s, 2, 2 * rank + 1, n, scale=0.4),
        mask,
        rnd(2, n, n, scale=0.3),
    )


def merged_compose(a, q_factors, k_factors, static_mix, use_static_mix):
    """Oracle: the compose as one N x N matrix per (t, s): a' = a (I + U_t^T V_t + U_s^T V_s
    + diag(g_t) + diag(g_s) (+ Wb))."""
    r = (q_factors.shape[-2] - 1) // 2
    n = a.shape[1]

    def per_token(f):  # [B,X,2R+1,N] -> [B,X,N,N]
        return f[..., :r, :].transpose(-1, -2) @ f[..., r : 2 * r, :] + torch.diag_embed(f[..., 2 * r, :])

    w = per_token(q_factors)[:, :, None] + per_token(k_factors)[:, None, :] + torch.eye(n, dtype=a.dtype)
    if use_static_mix:
        w = w + static_mix
    return torch.einsum("bnts,btsnm->bmts", a, w)


def plain_attention(q, k, v, allowed):
    """Softmax attention [B,T,N,d] with a bool mask [B,1,T,S], written out here."""
    logits = torch.einsum("btnd,bsnd->bnts", q, k) / math.sqrt(q.shape[-1])
    logits = logits.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bnts,bsnd->btnd", logits.softmax(-1), v)


def positions_allowed(mask, t, causal, window=0):
    s = mask.shape[1]
    i = torch.arange(t)[:, None] + (s - t)
    j = torch.arange(s)[None, :]
    keep = torch.ones(t, s, dtype=torch.bool)
    if causal:
        keep = (j <= i) & ((i - j < window) if window else keep)
    return mask[:, None, None, :] & keep


# ----------------------------------------------------------------------------- op references
@pytest.mark.parametrize("rank,use_static", [(1, False), (2, True), (3, True)])
def test_compose_reference_equals_merged_form(rank, use_static):
    gen = torch.Generator().manual_seed(rank)
    b, n, t, s = 2, 4, 3, 5
    a = torch.randn(b, n, t, s, generator=gen, dtype=torch.float64)
    qf = torch.randn(b, t, 2 * rank + 1, n, generator=gen, dtype=torch.float64)
    kf = torch.randn(b, s, 2 * rank + 1, n, generator=gen, dtype=torch.float64)
    wb = torch.randn(n, n, generator=gen, dtype=torch.float64)
    got = dcmha_compose_reference(a, qf, kf, wb, use_static)
    torch.testing.assert_close(got, merged_compose(a, qf, kf, wb, use_static), rtol=1e-12, atol=1e-12)


def test_attention_reference_equals_merged_compose_pipeline():
    q, k, v, qf, kf, mask, wb = op_inputs(2, 4, 6, seed=3, dtype=torch.float64)
    got = dcmha_attention_reference(q, k, v, qf, kf, mask, wb, 0.0, True, 3, True)
    allowed = positions_allowed(mask, 4, True, 3)
    logits = torch.einsum("btnd,bsnd->bnts", q, k) / math.sqrt(HEAD_DIM)
    logits = merged_compose(logits, qf[:, :, 0], kf[:, :, 0], wb[0], True)
    probs = torch.where(allowed, logits, torch.tensor(-1e30, dtype=torch.float64)).softmax(-1)
    probs = merged_compose(probs, qf[:, :, 1], kf[:, :, 1], wb[1], True)
    torch.testing.assert_close(got, torch.einsum("bnts,bsnd->btnd", probs, v), rtol=1e-12, atol=1e-12)


def test_attention_reference_zero_factors_is_softmax_attention():
    q, k, v, qf, kf, mask, wb = op_inputs(2, 3, 5, seed=4, dtype=torch.float64)
    got = dcmha_attention_reference(q, k, v, qf * 0, kf * 0, mask, wb, 0.0, True, 0, False)
    torch.testing.assert_close(got, plain_attention(q, k, v, positions_allowed(mask, 3, True)), rtol=1e-12, atol=1e-12)


def test_attention_window_needs_causal():
    q, k, v, qf, kf, mask, wb = op_inputs(1, 2, 2)
    with pytest.raises(ValueError, match="window"):
        dcmha_attention_reference(q, k, v, qf, kf, mask, wb, 0.0, False, 2, False)


# ----------------------------------------------------------------------------- bodies in ORT
class AttentionCall(torch.nn.Module):
    def __init__(self, scale: float, causal: bool, window: int, use_static_mix: bool) -> None:
        super().__init__()
        self.attrs = (scale, causal, window, use_static_mix)

    def forward(self, q, k, v, q_factors, k_factors, key_padding_mask, static_mix):
        return torch.ops.attn2onnx.dcmha_attention(
            q, k, v, q_factors, k_factors, key_padding_mask, static_mix, *self.attrs
        )


class ComposeCall(torch.nn.Module):
    def forward(self, a, q_factors, k_factors, static_mix):
        return torch.ops.attn2onnx.dcmha_compose(a, q_factors, k_factors, static_mix, True)


def attention_dynamic_shapes():
    b, t, s = torch.export.Dim("b"), torch.export.Dim("t"), torch.export.Dim("s")
    return ({0: b, 1: t}, {0: b, 1: s}, {0: b, 1: s}, {0: b, 1: t}, {0: b, 1: s}, {0: b, 1: s}, None)


# (attributes, shapes (B, T, S) run through one exported model)
# (plain causal attention without a window runs through ORT in test_layer_exports_to_ort)
ATTENTION_CASES = {
    "bidirectional_scaled": ((0.3, False, 0, False), [(2, 5, 7), (1, 1, 4), (3, 6, 6)]),
    "causal_window_static": ((0.0, True, 3, True), [(2, 6, 6), (2, 1, 5), (1, 3, 8), (3, 4, 4)]),
}


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_body_in_ort_matches_reference(case):
    attrs, shapes = ATTENTION_CASES[case]
    module = AttentionCall(*attrs)
    model = export_with_functions(module, op_inputs(2, 3, 4), attention_dynamic_shapes())
    assert [(n.domain, n.op_type) for n in model.graph.node] == [(DOMAIN, "DcmhaAttention")]
    session = ort_session(model)
    for seed, (b, t, s) in enumerate(shapes):
        inputs = op_inputs(b, t, s, seed=seed)
        expected = dcmha_attention_reference(*[x.double() if x.is_floating_point() else x for x in inputs], *attrs)
        got = run(session, *inputs)
        assert got.shape == (b, t, N_HEADS, HEAD_DIM)
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-5, err_msg=f"{case} {(b, t, s)}")


def test_compose_body_in_ort_matches_reference():
    b, t, s, rows = (torch.export.Dim(n) for n in ("b", "t", "s", "rows"))
    shapes = ({0: b, 2: t, 3: s}, {0: b, 1: t, 2: rows}, {0: b, 1: s, 2: rows}, None)
    gen = torch.Generator().manual_seed(7)

    def inputs(bb, tt, ss, rank):
        return (
            torch.randn(bb, N_HEADS, tt, ss, generator=gen),
            torch.randn(bb, tt, 2 * rank + 1, N_HEADS, generator=gen),
            torch.randn(bb, ss, 2 * rank + 1, N_HEADS, generator=gen),
            torch.randn(N_HEADS, N_HEADS, generator=gen),
        )

    model = export_with_functions(ComposeCall(), inputs(2, 3, 4, 2), shapes)
    session = ort_session(model)
    for bb, tt, ss, rank in [(2, 3, 4, 2), (1, 1, 6, 1), (3, 5, 2, 3)]:
        x = inputs(bb, tt, ss, rank)
        expected = dcmha_compose_reference(*[y.double() for y in x], True)
        np.testing.assert_allclose(run(session, *x), expected.numpy(), rtol=1e-4, atol=1e-5)


def test_function_bodies_attach_and_check():
    protos = custom_ops.function_protos()
    assert {"DcmhaAttention", "DcmhaCompose"} <= set(protos)
    body = protos["DcmhaAttention"]
    assert [a.name for a in body.attribute_proto] == ["scale", "causal", "window", "use_static_mix"]
    # the attention body reuses the compose function instead of repeating it
    calls = [n for n in body.node if n.domain == DOMAIN]
    assert [n.op_type for n in calls] == ["DcmhaCompose", "DcmhaCompose"]


# ----------------------------------------------------------------------------- autograd
def test_gradcheck_attention():
    q, k, v, qf, kf, mask, wb = op_inputs(2, 3, 4, n=2, d=2, rank=1, seed=5, dtype=torch.float64)
    leaves = [t.requires_grad_() for t in (q, k, v, qf, kf, wb)]

    def fn(q, k, v, qf, kf, wb):
        return torch.ops.attn2onnx.dcmha_attention(q, k, v, qf, kf, mask, wb, 0.0, True, 2, True)

    assert torch.autograd.gradcheck(fn, leaves, fast_mode=True)


def test_gradcheck_compose():
    gen = torch.Generator().manual_seed(6)
    a, qf, kf, wb = (
        torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()
        for shape in ((1, 2, 3, 2), (1, 3, 5, 2), (1, 2, 5, 2), (2, 2))
    )
    assert torch.autograd.gradcheck(
        lambda *x: torch.ops.attn2onnx.dcmha_compose(*x, True), (a, qf, kf, wb), fast_mode=True
    )


def test_opcheck_ops():
    q, k, v, qf, kf, mask, wb = op_inputs(1, 2, 3, n=2, d=2, rank=1, seed=8)
    q.requires_grad_()
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")  # aot_dispatch: slow, gradcheck covers it
    torch.library.opcheck(
        torch.ops.attn2onnx.dcmha_attention.default, (q, k, v, qf, kf, mask, wb, 0.0, True, 0, True), test_utils=utils
    )
    a = torch.randn(1, 2, 2, 3, requires_grad=True)
    torch.library.opcheck(
        torch.ops.attn2onnx.dcmha_compose.default, (a, qf[:, :, 0], kf[:, :, 0], wb[0], True), test_utils=utils
    )


# ----------------------------------------------------------------------------- the variant
def layer(seed=0, **options) -> DcmhaAttention:
    torch.manual_seed(seed)
    config = DcmhaConfig(**{"d_model": N_HEADS * HEAD_DIM, "n_heads": N_HEADS, **options})
    return DcmhaAttention(config).double().eval()


def projections(m: DcmhaAttention, x: torch.Tensor):
    heads = lambda t: t.unflatten(-1, (N_HEADS, HEAD_DIM))  # noqa: E731
    return [heads(torch.nn.functional.linear(x, p.weight, p.bias)) for p in (m.q_proj, m.k_proj, m.v_proj)]


@pytest.mark.parametrize("causal", [False, True])
def test_zero_dynamic_weights_is_plain_mha(causal):
    m = layer(causal=causal).zero_dynamic_weights()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, N_HEADS * HEAD_DIM, generator=gen, dtype=torch.float64)
    mask = random_padding(2, 5, gen)
    q, k, v = projections(m, x)
    o = plain_attention(q, k, v, positions_allowed(mask, 5, causal))
    expected = torch.nn.functional.linear(o.flatten(-2), m.o_proj.weight, m.o_proj.bias)
    torch.testing.assert_close(m(x, mask), expected, rtol=1e-12, atol=1e-12)


def test_zero_dynamic_weights_is_mha_with_qk_norm_and_rope():
    """QK-norm and RoPE written independently here: RoPE rotates the complex pairs
    (x_i, x_{i+h}) of the first 2h channels by position * base^(-i/h)."""
    m = layer(causal=True, qk_norm=True, rope=True, rotary_fraction=0.5, static_mix=True)
    with torch.no_grad():
        m.q_norm_gain.uniform_(0.5, 1.5)
        m.k_norm_gain.uniform_(0.5, 1.5)
    m.zero_dynamic_weights()
    x = torch.randn(1, 6, N_HEADS * HEAD_DIM, dtype=torch.float64)
    q, k, v = projections(m, x)
    norm = lambda t, g: t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * g  # noqa: E731
    q, k = norm(q, m.q_norm_gain), norm(k, m.k_norm_gain)
    h = m.config.rotary_dim // 2
    angle = torch.arange(6, dtype=torch.float64)[:, None, None] * 10000.0 ** (-torch.arange(h, dtype=torch.float64) / h)

    def rope(t):
        z = torch.complex(t[..., :h], t[..., h : 2 * h]) * torch.polar(torch.ones_like(angle), angle)
        return torch.cat([z.real, z.imag, t[..., 2 * h :]], dim=-1)

    o = plain_attention(rope(q), rope(k), v, positions_allowed(torch.ones(1, 6, dtype=torch.bool), 6, True))
    torch.testing.assert_close(m(x), m.o_proj(o.flatten(-2)), rtol=1e-12, atol=1e-12)


def test_fresh_layer_mixes_heads_and_trains():
    m = layer(causal=True, static_mix=True)
    x = torch.randn(2, 5, N_HEADS * HEAD_DIM, dtype=torch.float64)
    y = m(x)
    diff = (y - copy.deepcopy(m).zero_dynamic_weights()(x)).abs().max()
    assert 1e-9 < diff < 0.1 * y.abs().max()  # small but real mixing at init
    y.pow(2).sum().backward()
    for name in ("dw1", "qkw", "dd", "static_mix_weight", "q_proj.weight"):
        grad = m.get_parameter(name).grad
        assert grad is not None and grad.abs().max() > 0, name


def test_dynamic_factor_layout():
    m = layer()
    with torch.no_grad():  # at the authors' init |U|^2 is far below eps 1e-6: scale it up to see the RMS
        m.qkw.mul_(1e4)
    x = torch.randn(2, 4, N_HEADS * HEAD_DIM, dtype=torch.float64)
    qf, kf = m.dynamic_factors(x)
    assert qf.shape == kf.shape == (2, 4, 2, 5, N_HEADS)
    u = torch.cat([qf[..., :2, :], kf[..., :2, :]], dim=2)
    torch.testing.assert_close(u.pow(2).mean(-1), torch.ones_like(u[..., 0]), rtol=1e-4, atol=1e-4)  # RMS over heads
    gates = torch.tanh(x @ m.dd).unflatten(-1, (4, N_HEADS))  # slots: pre/q, pre/k, post/q, post/k
    torch.testing.assert_close(qf[..., 4, :], gates[:, :, [0, 2]])
    torch.testing.assert_close(kf[..., 4, :], gates[:, :, [1, 3]])


@pytest.mark.parametrize("splits", [[1] * 7, [3, 1, 1, 2], [7]])
def test_decode_equals_full_forward(splits):
    m = layer(causal=True, window=3, qk_norm=True, rope=True, static_mix=True, seed=2)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 7, N_HEADS * HEAD_DIM, generator=gen, dtype=torch.float64)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False  # right padding
    full = m(x, mask)
    cache, outs, start = m.init_cache(2), [], 0
    for n in splits:
        y, cache = m.forward_step(x[:, start : start + n], cache, mask[:, start : start + n])
        outs.append(y)
        start += n
        assert cache.k.shape[1] <= 2 and cache.k_factors.shape[2:] == (2, 5, N_HEADS)  # W - 1 tokens kept
    assert cache.position == 7
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-10, atol=1e-10)


def test_decode_global_layer_keeps_every_token():
    m = layer(causal=True, seed=4)
    x = torch.randn(1, 5, N_HEADS * HEAD_DIM, dtype=torch.float64)
    cache, outs = m.init_cache(1), []
    for i in range(5):
        y, cache = m.forward_step(x[:, i : i + 1], cache)
        outs.append(y)
    assert cache.k.shape[1] == 5
    torch.testing.assert_close(torch.cat(outs, dim=1), m(x), rtol=1e-10, atol=1e-10)


def test_layer_exports_to_ort():
    m = layer(causal=True, qk_norm=True, rope=True, rotary_fraction=0.5).float()
    x = torch.randn(2, 6, N_HEADS * HEAD_DIM)
    mask = torch.ones(2, 6, dtype=torch.bool)
    b, t = torch.export.Dim("b"), torch.export.Dim("t")
    model = export_with_functions(m, (x, mask), ({0: b, 1: t}, {0: b, 1: t}))
    assert [n.op_type for n in model.graph.node if n.domain == DOMAIN] == ["DcmhaAttention"]
    session = ort_session(model)
    for bb, tt in [(2, 6), (1, 1), (3, 9)]:
        x = torch.randn(bb, tt, N_HEADS * HEAD_DIM)
        mask = random_padding(bb, tt, torch.Generator().manual_seed(tt))
        with torch.no_grad():
            expected = m(x, mask)
        np.testing.assert_allclose(run(session, x, mask), expected.numpy(), rtol=1e-4, atol=1e-5)


def test_config_checks_and_presets():
    with pytest.raises(VariantError, match="causal"):
        DcmhaConfig(d_model=12, n_heads=3, window=4)
    with pytest.raises(VariantError, match="gelu"):
        DcmhaConfig(d_model=12, n_heads=3, gelu_approx="fast")
    with pytest.raises(VariantError, match="causal"):
        layer(causal=False).init_cache(1)
    assert DcmhaConfig(d_model=12, n_heads=3).k_dim == 12
    assert get_variant("dcmha").module_cls is DcmhaAttention
    assert isinstance(build_attention("dcmha", d_model=8, n_heads=2, causal=True), DcmhaAttention)
    sizes = {name: DcmhaConfig.published(name) for name in DcmhaConfig.PUBLISHED}
    assert {n: (c.d_model, c.n_heads, c.head_dim, c.k_dim) for n, c in sizes.items()} == {
        "dcformer-2.8b": (2560, 32, 80, 128),
        "dcpythia-6.9b": (4096, 32, 128, 128),
        "dcformer-405m": (1024, 16, 64, 64),
    }
    assert DcmhaConfig.published("dcformer-405m", layer=0).window == 256
    assert DcmhaConfig.published("dcformer-405m", layer=1).window is None
    assert DcmhaConfig.published("dcpythia-6.9b").rotary_dim == 32
