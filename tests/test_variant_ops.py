"""The ai.attn2onnx ops of the non-DCMHA variants: ProbAttention, LandmarkAttention and
PooledNormAttention.

For each op: its PyTorch reference == its standard-op ONNX function body run in stock ONNX
Runtime (exported once with dynamic batch / sequence dims, then run at several shapes: T = 1,
odd sizes, T != S, padding anywhere, fully padded rows); gradients flow through the torch op
(backward, float64 gradcheck, torch.library.opcheck); bad inputs are clear errors. Also the
error cases of the variant modules built on these ops.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import attn2onnx.custom_ops as custom_ops
from attn2onnx.custom_ops.landmark_attention import landmark_attention_reference
from attn2onnx.custom_ops.pooled_norm_attention import pooled_norm_attention_reference
from attn2onnx.custom_ops.prob_attention import prob_attention_reference
from attn2onnx.variants import VariantError, build_attention, get_variant

N, HEAD_DIM = 3, 5
MIX_NAMES = [
    "pre_mix_q",
    "pre_bias_q",
    "pre_mix_k",
    "pre_bias_k",
    "post_mix_q",
    "post_bias_q",
    "post_mix_k",
    "post_bias_k",
]


# ---------------------------------------------------------------- export / run helpers


def export_with_bodies(module: torch.nn.Module, args: tuple, dynamic_shapes: tuple) -> onnx.ModelProto:
    """Export with the ai.attn2onnx translation table, then attach every op's function body."""
    program = torch.onnx.export(
        module.eval(),
        args,
        dynamo=True,
        opset_version=23,
        verbose=False,
        dynamic_shapes=dynamic_shapes,
        custom_translation_table=custom_ops.translation_table(),
    )
    model = program.model_proto
    model.functions.extend(custom_ops.function_protos().values())
    if not any(o.domain == custom_ops.DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(custom_ops.DOMAIN, custom_ops.OPSET_VERSION))
    return model


class OpSession:
    """An ORT session of one exported op model; call it with torch tensors, get numpy back."""

    def __init__(self, module: torch.nn.Module, args: tuple, dynamic_shapes: tuple) -> None:
        model = export_with_bodies(module, args, dynamic_shapes)
        ops = [(n.domain, n.op_type) for n in model.graph.node]
        assert [op for op in ops if op[0] == custom_ops.DOMAIN] and len(ops) == 1, ops  # one bare custom node
        self.session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, *args: torch.Tensor) -> list[np.ndarray]:
        return self.session.run(None, {name: a.numpy() for name, a in zip(self.inputs, args)})


_DIMS = {name: torch.export.Dim(name) for name in ("B", "T", "S")}


def dims(*names: str) -> dict[int, torch.export.Dim]:
    """dynamic_shapes entry: axis i is the shared dynamic dim names[i]."""
    return {i: _DIMS[n] for i, n in enumerate(names)}


def masks(gen: torch.Generator, batch: int, length: int) -> list[torch.Tensor]:
    """No padding, right padding, holes anywhere (left padding too), and a fully padded row."""
    full = torch.ones(batch, length, dtype=torch.bool)
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    right = torch.arange(length)[None, :] < lengths[:, None]
    holes = torch.rand(batch, length, generator=gen) < 0.6
    holes[:, -1] = True
    holes[0, 0] = length == 1
    empty = holes.clone()
    empty[-1] = False
    return [full, right, holes, empty]


def qkv(gen: torch.Generator, batch: int, t: int, s: int, dtype=torch.float32):
    return (
        torch.randn(batch, t, N, HEAD_DIM, generator=gen, dtype=dtype),
        torch.randn(batch, s, N, HEAD_DIM, generator=gen, dtype=dtype),
        torch.randn(batch, s, N, HEAD_DIM, generator=gen, dtype=dtype),
    )


def assert_close(got: np.ndarray, want: torch.Tensor, what: str) -> None:
    np.testing.assert_allclose(got, want.detach().numpy(), atol=2e-5, rtol=1e-4, err_msg=what)


# ---------------------------------------------------------------- the ops as exportable modules


class ProbAttentionModel(torch.nn.Module):
    def __init__(self, scale: float, causal: bool) -> None:
        super().__init__()
        self.scale, self.causal = scale, causal

    def forward(self, q, k, v, key_padding_mask):
        return torch.ops.attn2onnx.prob_attention(q, k, v, key_padding_mask, self.scale, self.causal)


class LandmarkModel(torch.nn.Module):
    def __init__(self, landmarks: int, grid: int, scale: float) -> None:
        super().__init__()
        self.landmarks, self.grid, self.scale = landmarks, grid, scale

    def forward(
        self,
        q,
        k,
        v,
        key_padding_mask,
        pre_mix_q,
        pre_bias_q,
        pre_mix_k,
        pre_bias_k,
        post_mix_q,
        post_bias_q,
        post_mix_k,
        post_bias_k,
    ):
        return torch.ops.attn2onnx.landmark_attention(
            q,
            k,
            v,
            key_padding_mask,
            pre_mix_q,
            pre_bias_q,
            pre_mix_k,
            pre_bias_k,
            post_mix_q,
            post_bias_q,
            post_mix_k,
            post_bias_k,
            self.landmarks,
            self.grid,
            self.scale,
        )


class PooledNormModel(torch.nn.Module):
    def __init__(self, factors, normalize, eps, beta, rescale, scale) -> None:
        super().__init__()
        self.attrs = (list(factors), normalize, eps, beta, rescale, scale)

    def forward(self, q, k, v, key_padding_mask):
        return torch.ops.attn2onnx.pooled_norm_attention(q, k, v, key_padding_mask, *self.attrs)


def random_mixing(gen: torch.Generator, dtype=torch.float32) -> list[torch.Tensor]:
    """Non-trivial mixes (identity + noise) and biases for both stages."""
    out = []
    for name in MIX_NAMES:
        if "mix" in name:
            out.append(torch.eye(N, dtype=dtype) + 0.5 * torch.randn(N, N, generator=gen, dtype=dtype))
        else:
            out.append(0.3 * torch.randn(N, generator=gen, dtype=dtype))
    return out


# ---------------------------------------------------------------- reference == ONNX body in ORT

PROB_CASES = {"full": (0.0, False), "causal-scaled": (0.3, True)}


@pytest.mark.parametrize("case", list(PROB_CASES))
def test_prob_attention_body_matches_reference(case):
    scale, causal = PROB_CASES[case]
    gen = torch.Generator().manual_seed(1)
    run = OpSession(
        ProbAttentionModel(scale, causal),
        (*qkv(gen, 2, 4, 6), torch.ones(2, 6, dtype=torch.bool)),
        (dims("B", "T"), dims("B", "S"), dims("B", "S"), dims("B", "S")),
    )
    # T != S: queries aligned to the end of the keys (decoding with a cache), T = 1 included
    for batch, t, s in [(2, 4, 6), (1, 1, 1), (3, 7, 7), (1, 1, 9), (2, 3, 5)]:
        q, k, v = qkv(gen, batch, t, s)
        for mask in masks(gen, batch, s):
            o, probs = prob_attention_reference(q, k, v, mask, scale, causal)
            got_o, got_probs = run(q, k, v, mask)
            what = f"{case} B={batch} T={t} S={s} mask={mask.tolist()}"
            assert_close(got_o, o, what + " o")
            assert_close(got_probs, probs, what + " probs")
            np.testing.assert_allclose(got_probs.sum(-1), 1.0, atol=1e-5)


def test_prob_attention_masks_exactly():
    """Masked keys (padding, future) get probability exactly 0; a fully padded row is uniform."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = qkv(gen, 2, 3, 5)
    mask = torch.tensor([[True, False, True, True, True], [False] * 5])
    _, probs = prob_attention_reference(q, k, v, mask, 0.0, True)
    assert (probs[0, :, :, 1] == 0).all()
    future = torch.arange(5)[None, :] > torch.arange(3)[:, None] + 2  # query t sits at t + S - T
    assert (probs[0][:, future] == 0).all()
    torch.testing.assert_close(probs[1], torch.full_like(probs[1], 0.2))


LANDMARK_CASES = {
    "segments3": (3, 0, [(2, 7), (1, 1), (3, 2), (2, 12)]),  # L > n (empty segments) and L < n
    "grid2": (4, 2, [(2, 16), (1, 1), (3, 9), (1, 25)]),  # side divisible by s, and not
}


@pytest.mark.parametrize("case", list(LANDMARK_CASES))
def test_landmark_attention_body_matches_reference(case):
    landmarks, grid, shapes = LANDMARK_CASES[case]
    gen = torch.Generator().manual_seed(3)
    mixing = random_mixing(gen)
    example = (*qkv(gen, 2, 9, 9), torch.ones(2, 9, dtype=torch.bool), *mixing)
    run = OpSession(LandmarkModel(landmarks, grid, 0.0), example, (dims("B", "T"),) * 4 + (None,) * 8)
    for batch, t in shapes:
        q, k, v = qkv(gen, batch, t, t)
        for mask in masks(gen, batch, t):
            want = landmark_attention_reference(q, k, v, mask, *mixing, landmarks, grid, 0.0)
            assert_close(run(q, k, v, mask, *mixing)[0], want, f"{case} B={batch} T={t} mask={mask.tolist()}")


POOLED_CASES = {
    "sh": ((1, 2, 3), False, 1e-5, 1.0, True),
    "bn": ((1, 1, 1), True, 1e-5, 1.0, True),
    "bn-sh-centre": ((2, 1, 3), True, 1e-3, 0.7, False),
    "bn-sh-rescale": ((3, 3, 2), True, 1e-5, 0.5, True),
}


@pytest.mark.parametrize("case", list(POOLED_CASES))
def test_pooled_norm_attention_body_matches_reference(case):
    attrs = POOLED_CASES[case]
    gen = torch.Generator().manual_seed(4)
    run = OpSession(
        PooledNormModel(*attrs, 0.0),
        (*qkv(gen, 2, 6, 6), torch.ones(2, 6, dtype=torch.bool)),
        (dims("B", "T"), dims("B", "S"), dims("B", "S"), dims("B", "S")),
    )
    # partial last windows (S not a multiple of the factor), S < factor, T != S
    for batch, t, s in [(2, 6, 6), (1, 1, 1), (3, 7, 7), (2, 2, 2), (1, 4, 9)]:
        q, k, v = qkv(gen, batch, t, s)
        for mask in masks(gen, batch, s):
            want = pooled_norm_attention_reference(q, k, v, mask, *attrs, 0.0)
            assert_close(run(q, k, v, mask)[0], want, f"{case} B={batch} T={t} S={s} mask={mask.tolist()}")


def test_pooled_norm_groups_heads_by_factor():
    """Heads keep their order whatever the factor grouping: permuting heads and factors
    together permutes the output heads."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = qkv(gen, 2, 7, 7)
    mask = masks(gen, 2, 7)[2]
    factors, perm = [3, 1, 2], [2, 0, 1]
    out = pooled_norm_attention_reference(q, k, v, mask, factors, True, 1e-5, 1.0, True, 0.0)
    permuted = pooled_norm_attention_reference(
        q[:, :, perm], k[:, :, perm], v[:, :, perm], mask, [factors[p] for p in perm], True, 1e-5, 1.0, True, 0.0
    )
    torch.testing.assert_close(permuted, out[:, :, perm])


# ---------------------------------------------------------------- gradients


def _op_calls(dtype, gen):
    """(name, differentiable inputs, fn(*inputs) -> output tensors) per op, tiny shapes."""
    q, k, v = qkv(gen, 2, 3, 4, dtype)
    mask = torch.tensor([[True, True, False, True], [True, True, True, True]])
    qs, ks, vs = qkv(gen, 2, 4, 4, dtype)
    mixing = random_mixing(gen, dtype)
    return [
        ("ProbAttention", (q, k, v), lambda q, k, v: torch.ops.attn2onnx.prob_attention(q, k, v, mask, 0.0, True)),
        (
            "LandmarkAttention",
            (qs, ks, vs, *mixing),
            lambda q, k, v, *mix: torch.ops.attn2onnx.landmark_attention(q, k, v, mask, *mix, 2, 0, 0.0),
        ),
        (
            "PooledNormAttention",
            (q, k, v),
            lambda q, k, v: torch.ops.attn2onnx.pooled_norm_attention(
                q, k, v, mask, [1, 2, 3], True, 1e-5, 0.8, True, 0.0
            ),
        ),
    ]


@pytest.mark.parametrize("index", [0, 1, 2], ids=["ProbAttention", "LandmarkAttention", "PooledNormAttention"])
def test_ops_backward_and_gradcheck(index):
    gen = torch.Generator().manual_seed(6)
    name, inputs, fn = _op_calls(torch.float32, gen)[index]
    inputs = [t.clone().requires_grad_(True) for t in inputs]
    outputs = fn(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    sum(o.square().sum() for o in outputs).backward()
    for i, t in enumerate(inputs):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0, (name, i)

    name, inputs, fn = _op_calls(torch.float64, gen)[index]
    inputs = tuple(t.clone().requires_grad_(True) for t in inputs)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5), name


def test_ops_pass_opcheck():
    """Schema, fake (shape) functions and autograd registration are consistent (the
    aot_dispatch_dynamic check passes too but costs ~10 s, so it is left out)."""
    gen = torch.Generator().manual_seed(7)
    q, k, v = qkv(gen, 2, 3, 4)
    mask = torch.ones(2, 4, dtype=torch.bool)
    qs, ks, vs = qkv(gen, 2, 4, 4)
    checks = [
        (torch.ops.attn2onnx.prob_attention.default, (q, k, v, mask, 0.0, True)),
        (torch.ops.attn2onnx.landmark_attention.default, (qs, ks, vs, mask, *random_mixing(gen), 2, 0, 0.0)),
        (torch.ops.attn2onnx.pooled_norm_attention.default, (q, k, v, mask, [1, 2, 2], True, 1e-5, 1.0, True, 0.0)),
    ]
    for op, args in checks:
        args = tuple(
            a.clone().requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args
        )
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


# ---------------------------------------------------------------- errors


def test_op_errors():
    gen = torch.Generator().manual_seed(8)
    q, k, v = qkv(gen, 2, 4, 4)
    mask = torch.ones(2, 4, dtype=torch.bool)
    mixing = random_mixing(gen)
    with pytest.raises(ValueError, match="key_padding_mask"):
        torch.ops.attn2onnx.prob_attention(q, k, v, mask[:, :3], 0.0, False)
    with pytest.raises(ValueError, match="expected q"):
        torch.ops.attn2onnx.prob_attention(q, k, v[:, :3], mask, 0.0, False)
    with pytest.raises(ValueError, match="landmarks"):
        torch.ops.attn2onnx.landmark_attention(q, k, v, mask, *mixing, 3, 2, 0.0)  # grid 2 needs L = 4
    with pytest.raises(ValueError, match="square"):
        x = torch.randn(1, 5, N, HEAD_DIM)
        torch.ops.attn2onnx.landmark_attention(x, x, x, torch.ones(1, 5, dtype=torch.bool), *mixing, 4, 2, 0.0)
    with pytest.raises(ValueError, match="pre_q"):
        torch.ops.attn2onnx.landmark_attention(q, k, v, mask, torch.eye(N + 1), *mixing[1:], 2, 0, 0.0)
    for factors in ([1, 2], [1, 0, 2]):
        with pytest.raises(ValueError, match="factors"):
            torch.ops.attn2onnx.pooled_norm_attention(q, k, v, mask, factors, False, 1e-5, 1.0, True, 0.0)


@pytest.mark.parametrize("name", ["imhsa", "bn", "sh", "bn-sh"])
def test_non_causal_variants_refuse_causal(name):
    with pytest.raises(VariantError, match="causal"):
        build_attention(name, d_model=12, n_heads=3, causal=True)
    info = get_variant(name)
    with pytest.raises(VariantError, match="causal"):  # the module itself refuses, not only the registry
        info.module_cls(info.config_cls(d_model=12, n_heads=3, causal=True))


def test_variant_option_errors():
    with pytest.raises(VariantError, match="landmarks"):
        build_attention("imhsa", d_model=12, n_heads=3, grid=3)  # grid 3 needs landmarks=9
    with pytest.raises(VariantError, match="mix"):
        build_attention("imhsa", d_model=12, n_heads=3, mix="sideways")
    with pytest.raises(VariantError, match="sh_factors"):
        build_attention("sh", d_model=12, n_heads=3, sh_factors=(1, 2))
    with pytest.raises(VariantError, match="reuse_heads"):
        build_attention("reuse", d_model=12, n_heads=3, reuse_heads=4)
    sup = build_attention("super", d_model=12, n_heads=3, max_len=5)
    with pytest.raises(VariantError, match="max_len"):
        sup(torch.randn(1, 6, 12))
    reuse = build_attention("reuse", d_model=12, n_heads=3, reuse_heads=1)
    with pytest.raises(VariantError, match="prev_probs"):
        reuse(torch.randn(2, 4, 12))
    with pytest.raises(VariantError, match="prev_probs"):
        reuse(torch.randn(2, 4, 12), prev_probs=torch.rand(2, 3, 4, 5))


def test_variant_defaults_and_parameters():
    assert build_attention("sh", d_model=15, n_heads=5).factors == [1, 1, 1, 2, 2]
    assert build_attention("bn", d_model=15, n_heads=5).factors == [1] * 5
    im = build_attention("imhsa", d_model=12, n_heads=3, mix="post")
    assert sorted(n for n, _ in im.named_parameters() if "mix" in n or "bias_" in n) == [
        "post_bias_k",
        "post_bias_q",
        "post_mix_k",
        "post_mix_q",
    ]
    assert "identity_mix" not in im.state_dict()
    reuse = build_attention("reuse", d_model=12, n_heads=3, reuse_heads=3)
    assert not hasattr(reuse, "q_proj") and not hasattr(reuse, "k_proj")
    assert build_attention("reuse", d_model=12, n_heads=3, reuse_heads=1).q_proj.out_features == 8
    sup = build_attention("super", d_model=32, n_heads=4, max_len=32)
    assert sum(p.numel() for p in sup.parameters()) == 3168  # variants.md's table: WA has a bias by default
    assert not hasattr(build_attention("super", d_model=32, n_heads=4, max_len=32, wa_bias=False), "wa_bias")


@pytest.mark.parametrize(
    "name,options",
    [
        ("mha", {"causal": True}),
        ("optimised", {}),
        ("efficient", {"causal": True}),
        ("super", {"causal": True, "max_len": 8, "wa_bias": True}),
        ("imhsa", {"landmarks": 3, "mix": "both"}),
        ("reuse", {"reuse_heads": 1, "causal": True}),
        ("bn", {}),
        ("sh", {}),
        ("bn-sh", {}),
    ],
)
def test_variant_modules_train(name, options):
    """Every parameter gets a gradient through the ops (their autograd differentiates the
    references), with padding."""
    torch.manual_seed(0)
    module = build_attention(name, d_model=12, n_heads=3, **options)
    x = torch.randn(2, 7, 12)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False
    if getattr(module, "passes_probs", False):
        prev = torch.softmax(torch.randn(2, 3, 7, 7), -1)
        y, probs = module(x, mask, prev_probs=prev)
        assert probs.shape == (2, 3, 7, 7)
    else:
        y = module(x, mask)
    assert y.shape == x.shape
    with torch.no_grad():  # perturb the identity / zero inits so every parameter matters
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    y = module(x, mask, prev_probs=prev)[0] if getattr(module, "passes_probs", False) else module(x, mask)
    y[mask].square().sum().backward()
    for pname, p in module.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, (name, pname)
