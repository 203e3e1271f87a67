"""Independent float64 numpy oracles for every attention variant, written from the numerical
contract (docs/variants.md; the op semantics of docs/ops.md for iMHSA's pooling), never from
the modules. One function per variant taking explicit weight arrays in math convention
(W [in, out], y = x @ W + b); :func:`run_oracle` maps a module's parameters (nn.Linear
convention, by the names in attn2onnx/variants/base.py) and config onto them.

Pure numpy: nothing here imports torch or attn2onnx.
"""

from __future__ import annotations

from ._common import NEG
from .bn import bn
from .bn_sh import bn_sh
from .dcmha import compose, dcmha, dcmha_decode, dynamic_factors
from .efficient import efficient
from .imhsa import imhsa, pooling_matrix
from .mha import mha
from .optimised import optimised
from .reuse import reuse
from .sh import default_factors, pool_tokens, pooled_norm_attention, sh
from .super import super_attention, super_mix


def param(params: dict, name: str, required: bool = True):
    """params[name], or the unique entry ending in '.' + name (submodule prefixes)."""
    if name in params:
        return params[name]
    hits = [k for k in params if k.endswith("." + name)]
    if len(hits) == 1:
        return params[hits[0]]
    if required:
        raise KeyError(f"parameter {name!r} not found (or ambiguous: {hits}); have {sorted(params)}")
    return None


def linear_weights(params: dict, proj: str, required: bool = True):
    """(W [in, out], b or None) of the nn.Linear called ``proj`` (stored W is [out, in])."""
    w = param(params, f"{proj}.weight", required)
    return (None if w is None else w.T), param(params, f"{proj}.bias", required=False)


def _projections(params, names=("q", "k", "v", "o"), required=True):
    out = {}
    for p in names:
        w, b = linear_weights(params, f"{p}_proj", required)
        out[f"w{p}"], out[f"b{p}"] = w, b
    return out


def oracle_kwargs(name: str, params: dict, config: dict) -> dict:
    """Keyword arguments (weights and options, no input) of the oracle of variant ``name``."""
    n = config["n_heads"]
    if name == "mha":
        return dict(_projections(params), n_heads=n, causal=config.get("causal", False))
    if name == "optimised":
        return dict(_projections(params, "qko"), n_heads=n, causal=config.get("causal", False))
    if name == "efficient":
        return dict(_projections(params, "qo"), n_heads=n, causal=config.get("causal", False))
    if name == "super":
        return dict(
            _projections(params, "qo"),
            wa=param(params, "wa"),
            wa_bias=param(params, "wa_bias", False),
            n_heads=n,
            causal=config.get("causal", False),
        )
    if name == "dcmha":
        kw = dict(
            _projections(params),
            n_heads=n,
            dw1=param(params, "dw1"),
            qkw=param(params, "qkw"),
            dd=param(params, "dd"),
            causal=config.get("causal", False),
            window=config.get("window", 0) or 0,
            qk_norm=bool(config.get("qk_norm", False)),
            use_rope=bool(config.get("rope", False)),
            rope_base=config.get("rope_base", 10000.0),
            rotary_fraction=config.get("rotary_fraction", 1.0),
            gelu_approx=config.get("gelu_approx", "none"),
        )
        if kw["qk_norm"]:
            kw["q_norm_gain"] = param(params, "q_norm_gain")
            kw["k_norm_gain"] = param(params, "k_norm_gain")
        if config.get("static_mix", False):
            kw["static_mix"] = param(params, "static_mix_weight")
        return kw
    if name == "imhsa":
        kw = dict(
            _projections(params),
            n_heads=n,
            landmarks=config["landmarks"],
            grid=config.get("grid", 0) or 0,
            mix=config.get("mix", "pre"),
        )
        for side in ("pre", "post"):
            for kind in ("mix", "bias"):
                for qk in ("q", "k"):
                    key = f"{side}_{kind}_{qk}"
                    kw[key] = param(params, key, required=False)
        return kw
    if name == "reuse":
        p = config["reuse_heads"]
        proj = _projections(params, "vo")
        if p < n:
            proj.update(_projections(params, "qk"))
        else:
            proj.update(wq=None, bq=None, wk=None, bk=None)
        return dict(proj, n_heads=n, reuse_heads=p, causal=config.get("causal", False))
    if name in ("bn", "sh", "bn-sh"):
        kw = dict(_projections(params), n_heads=n)
        if name != "sh":
            kw.update(eps=config.get("eps", 1e-5), beta=config.get("beta", 1.0), rescale=config.get("rescale", True))
        if name != "bn":
            f = config.get("sh_factors")
            kw["factors"] = None if not f else list(f)
        return kw
    raise KeyError(f"no oracle for variant {name!r}")


ORACLES = {
    "mha": mha,
    "optimised": optimised,
    "efficient": efficient,
    "super": super_attention,
    "dcmha": dcmha,
    "imhsa": imhsa,
    "reuse": reuse,
    "bn": bn,
    "sh": sh,
    "bn-sh": bn_sh,
}


def run_oracle(name: str, params: dict, config: dict, x, key_padding_mask=None, **extra):
    """Oracle output of variant ``name`` for a module's float64 parameters and config dict.
    ``extra`` overrides/adds keyword arguments (e.g. prev_probs for reuse)."""
    kw = oracle_kwargs(name, params, config)
    kw.update(extra)
    return ORACLES[name](x, key_padding_mask=key_padding_mask, **kw)


__all__ = [
    "NEG",
    "ORACLES",
    "bn",
    "bn_sh",
    "compose",
    "dcmha",
    "dcmha_decode",
    "default_factors",
    "dynamic_factors",
    "efficient",
    "imhsa",
    "linear_weights",
    "mha",
    "optimised",
    "oracle_kwargs",
    "param",
    "pool_tokens",
    "pooled_norm_attention",
    "pooling_matrix",
    "reuse",
    "run_oracle",
    "sh",
    "super_attention",
    "super_mix",
]
