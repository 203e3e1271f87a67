"""Model families (CausalLM, EncoderClassifier, AttentionLayer) around every registered
variant: build, run at dynamic shapes, masks, causality, training, torch.export, bad input."""

from __future__ import annotations

import pytest
import torch
from torch.export import Dim

from attn2onnx import ModelConfig, UsageError, VariantError, build_model
from attn2onnx.models import AttentionLayer, CausalLM, EncoderClassifier
from attn2onnx.variants import VARIANTS

TINY = dict(d_model=32, heads=4, max_len=24, vocab_size=13, num_classes=3)
IMAGE = dict(image_size=8, patch_size=2, channels=3)  # 16 patches + CLS = 17 tokens
NON_CAUSAL_BY_DESIGN = ("imhsa", "bn", "sh", "bn-sh")  # variants.md: cannot be causal

# (family, variant, input kind) for every variant in every family it fits
CASES = [
    (family, name, kind)
    for name, info in VARIANTS.items()
    for family in info.families
    for kind in (("tokens", "image") if family == "encoder" else (None,))
]
CASE_IDS = [f"{f}-{v}" + (f"-{k}" if k else "") for f, v, k in CASES]


def tiny_config(family: str, variant: str, kind: str | None = None, **overrides) -> ModelConfig:
    options = dict(TINY, layers=None if family == "layer" else 2)
    if kind == "image":
        options.update(IMAGE)
    options.update(overrides)
    return ModelConfig(family=family, variant=variant, **options)


def make_input(config: ModelConfig, batch: int, seq: int, generator: torch.Generator | None = None) -> torch.Tensor:
    if config.family == "layer":
        return torch.randn(batch, seq, config.d_model, generator=generator)
    if config.is_image:
        return torch.randn(batch, config.channels, config.image_size, config.image_size, generator=generator)
    return torch.randint(0, config.vocab_size, (batch, seq), generator=generator)


def output_shape(config: ModelConfig, batch: int, seq: int) -> tuple[int, ...]:
    return {
        "lm": (batch, seq, config.vocab_size),
        "encoder": (batch, config.num_classes),
        "layer": (batch, seq, config.d_model),
    }[config.family]


def real_variants(predicate) -> list[str]:
    return [name for name, info in VARIANTS.items() if predicate(info)]


# --- build and run --------------------------------------------------------------------------
@pytest.mark.parametrize("family,variant,kind", CASES, ids=CASE_IDS)
def test_builds_and_runs_at_dynamic_shapes(family, variant, kind):
    config = tiny_config(family, variant, kind)
    model = build_model(config).eval()
    assert model.config is config
    assert isinstance(model, {"lm": CausalLM, "encoder": EncoderClassifier, "layer": AttentionLayer}[family])
    for batch, seq in ((1, 5), (3, 11)):
        x = make_input(config, batch, seq)
        with torch.no_grad():
            y = model(x)
        assert y.shape == output_shape(config, batch, seq)
        assert torch.isfinite(y).all()


@pytest.mark.parametrize("variant", real_variants(lambda i: "encoder" in i.families))
def test_encoder_padding_is_invisible(variant):
    """Right-padded token input with its key_padding_mask gives the same logits as the
    unpadded sequence, whatever the padded ids are."""
    config = tiny_config("encoder", variant)
    model = build_model(config).eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (2, 10), generator=gen)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False
    other = ids.clone()
    other[1, 6:] = (ids[1, 6:] + 5) % config.vocab_size
    with torch.no_grad():
        padded = model(ids, mask)
        padded_other = model(other, mask)
        alone = model(ids[1:, :6])
    torch.testing.assert_close(padded[1], padded_other[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded[1], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded[0], padded_other[0], atol=0, rtol=0)


@pytest.mark.parametrize("variant", real_variants(lambda i: "lm" in i.families))
def test_lm_is_causal(variant):
    """Logits at position t do not depend on tokens after t."""
    config = tiny_config("lm", variant)
    model = build_model(config).eval()
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, config.vocab_size, (2, 12), generator=gen)
    changed = ids.clone()
    changed[:, 7:] = (ids[:, 7:] + 3) % config.vocab_size
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


@pytest.mark.parametrize("variant", real_variants(lambda i: "lm" in i.families))
def test_lm_takes_a_padding_mask(variant):
    config = tiny_config("lm", variant)
    model = build_model(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 6:] = False
    with torch.no_grad():
        padded, alone = model(ids, mask), model(ids[:1, :6])
    torch.testing.assert_close(padded[0, :6], alone[0], atol=1e-5, rtol=1e-5)


# --- training -------------------------------------------------------------------------------
def _task(config: ModelConfig, gen: torch.Generator):
    """A tiny fixed batch and its loss function."""
    batch, seq = 8, 8
    if config.family == "lm":  # next token of a counting sequence (mod V)
        start = torch.randint(0, config.vocab_size, (batch, 1), generator=gen)
        ids = (start + torch.arange(seq + 1)) % config.vocab_size
        return (ids[:, :-1],), lambda out: torch.nn.functional.cross_entropy(out.flatten(0, 1), ids[:, 1:].flatten())
    if config.family == "encoder":
        x = make_input(config, batch, seq, gen)
        labels = torch.arange(batch) % config.num_classes
        return (x,), lambda out: torch.nn.functional.cross_entropy(out, labels)
    x = make_input(config, batch, seq, gen)
    target = torch.randn(batch, seq, config.d_model, generator=gen)
    return (x,), lambda out: torch.nn.functional.mse_loss(out, target)


@pytest.mark.parametrize("family,variant,kind", CASES, ids=CASE_IDS)
def test_trains(family, variant, kind):
    """20 Adam steps on a tiny fixed batch lower the loss, and every parameter gets a gradient."""
    config = tiny_config(family, variant, kind)
    model = build_model(config).train()
    inputs, loss_fn = _task(config, torch.Generator().manual_seed(0))
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for step in range(20):
        optimiser.zero_grad()
        loss = loss_fn(model(*inputs))
        loss.backward()
        if step == 0:
            missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
            assert not missing, f"parameters without a finite gradient: {missing}"
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


# --- reuse: probabilities thread through the blocks -----------------------------------------
def _reuse_variant() -> str:
    names = real_variants(lambda i: getattr(i.module_cls, "passes_probs", False))
    if not names:
        pytest.skip("no probability-passing variant registered")
    return names[0]


def test_reuse_default_schedule_and_threading():
    variant = _reuse_variant()
    config = tiny_config("lm", variant, layers=9)
    assert config.reuse_schedule == [0, 4, 4, 4, 4, 4, 4, 0, 0]
    assert tiny_config("lm", variant, layers=3).reuse_schedule == [0, 4, 4]
    assert tiny_config("layer", variant).reuse_schedule == [0]
    model = build_model(tiny_config("encoder", variant, layers=3, reuse_schedule=[0, 2, 4])).eval()
    seen = []
    for block in model.trunk.blocks:
        block.attn.register_forward_hook(
            lambda mod, args, kwargs, out: seen.append((kwargs.get("prev_probs"), out[1])), with_kwargs=True
        )
    model(torch.randint(0, 13, (2, 6)))
    assert seen[0][0] is None
    for (_, produced), (received, _) in zip(seen, seen[1:]):
        assert received is produced  # each layer gets the previous layer's probabilities
    assert seen[0][1].shape == (2, 4, 7, 7)  # [B, N, T+CLS, T+CLS]


@pytest.mark.parametrize(
    "schedule,match",
    [([1, 0], "start with 0"), ([0], "one count per layer"), ([0, 5], r"\[0, 4\]"), ([0, 1.5], "integers")],
)
def test_reuse_schedule_checked(schedule, match):
    with pytest.raises(UsageError, match=match):
        tiny_config("lm", _reuse_variant(), reuse_schedule=schedule)


def test_reuse_schedule_only_for_reuse():
    variant = real_variants(lambda i: not getattr(i.module_cls, "passes_probs", False))[0]
    with pytest.raises(UsageError, match="reuse_schedule"):
        tiny_config("lm", variant, reuse_schedule=[0, 0])


# --- torch.export ---------------------------------------------------------------------------
# torch.export is slow (seconds per model): every family once, plus the families' special
# paths (reuse's probability threading, super's token mixing). Exporting every variant is the
# exporter's tests' job.
EXPORT_CASES = [(f, "mha") for f in ("lm", "encoder", "layer")] + [("lm", "reuse"), ("encoder", "super")]


@pytest.mark.parametrize("family,variant", EXPORT_CASES)
def test_torch_export_dynamic_batch_and_seq(family, variant):
    config = tiny_config(family, variant)
    model = build_model(config).eval()
    batch, seq = Dim("batch", max=64), Dim("seq", max=config.max_len - (family == "encoder"))
    x = make_input(config, 2, 7)
    mask = torch.ones(x.shape[:2], dtype=torch.bool)
    program = torch.export.export(model, (x, mask), dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}))
    x2 = make_input(config, 3, 10)
    mask2 = torch.ones(3, 10, dtype=torch.bool)
    mask2[1, 7:] = False
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x2, mask2), model(x2, mask2), atol=1e-5, rtol=1e-5)


def test_torch_export_rope_lm_has_no_positions():
    if "dcmha" not in VARIANTS:
        pytest.skip("dcmha not registered")
    config = tiny_config("lm", "dcmha", options={"rope": True})
    model = build_model(config).eval()
    assert model.pos is None and config.uses_rope
    assert build_model(tiny_config("lm", "dcmha")).pos is not None
    ids = torch.randint(0, 13, (2, 6))
    program = torch.export.export(model, (ids,), dynamic_shapes=({0: Dim("batch", max=64), 1: Dim("seq", max=24)},))
    ids2 = torch.randint(0, 13, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(ids2), model(ids2))


# --- config ---------------------------------------------------------------------------------
def test_config_defaults_and_round_trip():
    variant = list(VARIANTS)[0]
    lm = ModelConfig(family="lm", variant=variant)
    assert (lm.layers, lm.mlp) == (2, "swiglu") and lm.mlp_hidden % 8 == 0
    enc = ModelConfig(family="encoder", variant=variant)
    assert (enc.layers, enc.mlp, enc.mlp_hidden) == (2, "gelu", 4 * enc.d_model)
    assert ModelConfig(family="layer", variant=variant).layers == 1
    again = ModelConfig.from_dict(lm.to_dict())
    assert again == lm and again.to_dict() == lm.to_dict()


def test_build_is_deterministic_and_leaves_the_global_rng_alone():
    config = tiny_config("lm", list(VARIANTS)[0])
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, b = build_model(config), build_model(config)
    assert torch.rand(1) == before
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    c = build_model(tiny_config("lm", list(VARIANTS)[0], seed=1))
    assert not torch.equal(a.embed.weight, c.embed.weight)
    assert build_model(config.to_dict()).config == config  # a plain dict builds too


def test_mlp_kinds_and_untied_head():
    variant = list(VARIANTS)[0]
    tied = build_model(tiny_config("lm", variant))
    untied = build_model(tiny_config("lm", variant, tie_embeddings=False, mlp="gelu"))
    assert tied.head is None and untied.head.weight.shape == (13, 32)
    assert hasattr(untied.trunk.blocks[0].mlp, "fc1") and hasattr(tied.trunk.blocks[0].mlp, "gate")
    assert untied(torch.randint(0, 13, (1, 4))).shape == (1, 4, 13)


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        (dict(family="decoder"), UsageError, "unknown model family"),
        (dict(variant="no-such-attention"), VariantError, "unknown variant 'no-such-attention'"),
        (dict(layers=0), UsageError, "layers must be a positive integer"),
        (dict(d_model=30, heads=4), VariantError, "not divisible"),
        (dict(mlp="relu"), UsageError, "unknown mlp"),
        (dict(options={"no_such_option": 1}), VariantError, "no option"),
        (dict(options={"d_model": 8}), UsageError, "set the model's d_model"),
        (dict(options={"causal": False}), UsageError, "follows the family"),
        (dict(options=[1]), UsageError, "dict of variant options"),
        (dict(image_size=8), UsageError, "both patch_size and image_size"),
        (dict(image_size=8, patch_size=2), UsageError, "encoder options"),
    ],
)
def test_bad_configs(overrides, error, match):
    options = dict(family="lm", variant=list(VARIANTS)[0], **TINY)
    options.update(overrides)
    with pytest.raises(error, match=match):
        ModelConfig(**options)


def test_bad_image_configs():
    variant = list(VARIANTS)[0]
    with pytest.raises(UsageError, match="not a multiple of patch_size"):
        tiny_config("encoder", variant, image_size=9, patch_size=2)
    with pytest.raises(UsageError, match="17 tokens .* more than max_len 16"):
        tiny_config("encoder", variant, "image", max_len=16)
    with pytest.raises(UsageError, match="one bare attention layer"):
        tiny_config("layer", variant, layers=2)


def test_layer_family_takes_causal_option():
    variant = real_variants(lambda i: i.causal and "layer" in i.families)[0]
    model = build_model(tiny_config("layer", variant, options={"causal": True})).eval()
    x = torch.randn(1, 8, 32)
    changed = x.clone()
    changed[:, 5:] += 1.0
    with torch.no_grad():
        torch.testing.assert_close(model(x)[:, :5], model(changed)[:, :5], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", real_variants(lambda i: not i.causal))
def test_causal_lm_rejects_non_causal_variants(variant):
    with pytest.raises(VariantError, match=f"variant '{variant}' cannot be causal.*LM"):
        tiny_config("lm", variant)
    with pytest.raises(VariantError, match="cannot be causal"):
        tiny_config("layer", variant, options={"causal": True})


def test_non_causal_variants_are_marked_so():
    for name in NON_CAUSAL_BY_DESIGN:
        if name in VARIANTS:
            assert not VARIANTS[name].causal and "lm" not in VARIANTS[name].families, name


def test_option_types_are_checked():
    if "dcmha" not in VARIANTS:
        pytest.skip("dcmha not registered")
    with pytest.raises(VariantError, match="'rope' of variant 'dcmha' takes bool, got 'yes'"):
        tiny_config("lm", "dcmha", options={"rope": "yes"})
    with pytest.raises(VariantError, match="'rank' .* takes int, got 1.5"):
        tiny_config("lm", "dcmha", options={"rank": 1.5})
    with pytest.raises(VariantError, match=r"'k_dim' .* takes int \| None"):
        tiny_config("lm", "dcmha", options={"k_dim": "8"})
    config = tiny_config("lm", "dcmha", options={"rope_base": 500, "k_dim": None})
    assert config.options["rope_base"] == 500.0 and isinstance(config.options["rope_base"], float)
    if "sh" in VARIANTS:  # lists become tuples where the config wants a tuple, items checked
        assert tiny_config("encoder", "sh", options={"sh_factors": [1, 2, 2, 1]}).options["sh_factors"] == (1, 2, 2, 1)
        with pytest.raises(VariantError, match="'sh_factors' .* takes tuple"):
            tiny_config("encoder", "sh", options={"sh_factors": [1, 2.5, 1, 1]})


# --- bad input ------------------------------------------------------------------------------
def test_lm_bad_input():
    model = build_model(tiny_config("lm", list(VARIANTS)[0]))
    with pytest.raises(UsageError, match="token ids"):
        model(torch.randn(2, 5, 32))
    with pytest.raises(UsageError, match="integer token ids"):
        model(torch.rand(2, 5))
    with pytest.raises(UsageError, match="25 tokens, more than the model's max_len 24"):
        model(torch.zeros(1, 25, dtype=torch.long))
    with pytest.raises(UsageError, match="key_padding_mask must be"):
        model(torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 4, dtype=torch.bool))


def test_encoder_bad_input():
    variant = list(VARIANTS)[0]
    image = build_model(tiny_config("encoder", variant, "image"))
    with pytest.raises(UsageError, match=r"images \[batch, 3, 8, 8\]"):
        image(torch.randn(2, 3, 16, 16))
    with pytest.raises(UsageError, match="float images"):
        image(torch.zeros(2, 3, 8, 8, dtype=torch.long))
    with pytest.raises(UsageError, match="token input"):
        image(torch.randn(2, 3, 8, 8), torch.ones(2, 16, dtype=torch.bool))
    tokens = build_model(tiny_config("encoder", variant))
    with pytest.raises(UsageError, match="plus CLS has 25 tokens"):
        tokens(torch.zeros(1, 24, dtype=torch.long))
    with pytest.raises(UsageError, match="token ids"):
        tokens(torch.randn(2, 3, 8, 8))


def test_layer_bad_input():
    model = build_model(tiny_config("layer", list(VARIANTS)[0]))
    with pytest.raises((UsageError, VariantError), match="32"):
        model(torch.randn(2, 5, 16))


def test_super_longer_than_max_len_is_an_error():
    if "super" not in VARIANTS:
        pytest.skip("super not registered")
    layer = build_model(tiny_config("layer", "super", max_len=8))
    layer(torch.randn(1, 8, 32))
    with pytest.raises((UsageError, VariantError), match="8"):
        layer(torch.randn(1, 9, 32))
    lm = build_model(tiny_config("lm", "super", max_len=8))
    with pytest.raises(UsageError, match="max_len 8"):
        lm(torch.zeros(1, 9, dtype=torch.long))
