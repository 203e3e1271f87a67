"""TensorRT plugin of DcmhaAttention: the fused Triton kernel of :mod:`.triton_kernel`,
compiled ahead of time to PTX (``tensorrt.plugin`` register + aot_impl), so that an engine
runs it with no Python at all.

TensorRT's ONNX parser turns an ``ai.attn2onnx::DcmhaAttention`` node into this plugin when
the node carries ``plugin_namespace = "attn2onnx"`` (``passes.trt_plugins`` adds it) and
:func:`register` ran before parsing. TensorRT forbids dots in plugin namespaces, so the
namespace is ``attn2onnx``, not the ONNX domain ``ai.attn2onnx``.

Everything short of TensorRT itself is plain functions testable on a machine with neither a
GPU nor TensorRT: :func:`check_io` (shapes and dtypes), :func:`kernel_signature`,
:func:`compile_ptx` (Triton -> PTX for an explicit ``GPUTarget``) and :func:`ptx_entry_params`.

The plugin takes the op's 7 required inputs, never the optional ``attn_mask``: the trt pass
(``passes.trt_plugins``) leaves a node that passes one untagged, so TensorRT imports its
function body (the ``attn_mask`` overload) instead, and :func:`check_io` refuses the input.
(Not run here: no GPU or TensorRT on the machine this was written on.)

Kernel ABI (TensorRT AOT convention): the 7 input pointers, then the int32 extra arguments
T and S, then the output pointer (the kernel's mask pointer and strides are compile-time
constants None / 0 here, :data:`NO_MASK`); Triton appends its global/profile scratch pointers, which
TensorRT passes as null -- so :func:`compile_ptx` refuses a kernel that needs scratch memory.
The attributes are compile-time constants of the PTX (extra arguments can only be int32).

Note: this module deliberately has no ``from __future__ import annotations``: tensorrt.plugin
reads the decorated functions' annotations as live classes.
"""

import os
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

PLUGIN_NAMESPACE = "attn2onnx"
ONNX_OP = "DcmhaAttention"
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{ONNX_OP}"
INPUTS = ("q", "k", "v", "q_factors", "k_factors", "key_padding_mask", "static_mix")
SCALARS = ("T", "S")
# The Triton kernel's attn_mask arguments, fixed at compile time for the plugin (no mask).
NO_MASK = {"am_ptr": None, "am_sb": 0, "am_sn": 0, "am_st": 0, "am_ss": 0}
OUTPUTS = ("o",)
ATTRIBUTES = {"scale": float, "causal": int, "window": int, "use_static_mix": int}
INPUT_RANKS = {"q": 4, "k": 4, "v": 4, "q_factors": 5, "k_factors": 5, "key_padding_mask": 2, "static_mix": 3}
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
TRITON_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "bool": "i1"}
# Compute capabilities the plugin is built and tested for (A100 / H100 class).
ARCHS = (80, 90)
# PTX ISA of the emitted code: 8.5 loads on CUDA 12.5+ drivers. Triton would otherwise emit the
# ISA of its bundled ptxas (9.x for sm_90), which older drivers reject at engine run time.
# ATTN2ONNX_PTX_VERSION overrides it (0 = Triton's choice).
DEFAULT_PTX_VERSION = 85


class PluginError(ValueError):
    """The node cannot run as this plugin (dtype, rank, non-constant head sizes...)."""


def check_io(shapes: Mapping[str, Sequence[Optional[int]]], dtypes: Mapping[str, str]) -> Tuple[tuple, str]:
    """Validate the inputs of one node and return the output's (shape, dtype).

    ``shapes`` maps input name -> dims (None = not known at build time); ``dtypes`` maps input
    name -> "float32" | "float16" | "bfloat16" | "bool". The output is ``o`` [B,T,N,d] in the
    dtype of ``q``.
    """
    if "attn_mask" in shapes:
        raise PluginError(f"{ONNX_OP}: the plugin takes no attn_mask (such a node runs its function body)")
    missing = [n for n in INPUTS if n not in shapes or n not in dtypes]
    if missing:
        raise PluginError(f"{ONNX_OP}: missing inputs {missing}")
    for name in INPUTS:
        if len(shapes[name]) != INPUT_RANKS[name]:
            raise PluginError(f"{ONNX_OP}: input {name} must have rank {INPUT_RANKS[name]}, got {len(shapes[name])}")
    qd = dtypes["q"]
    if qd not in FLOAT_DTYPES:
        raise PluginError(f"{ONNX_OP}: q must be float32, float16 or bfloat16, got {qd}")
    for name in ("k", "v"):
        if dtypes[name] != qd:
            raise PluginError(f"{ONNX_OP}: {name} must have q's dtype {qd}, got {dtypes[name]}")
    for name in ("q_factors", "k_factors", "static_mix"):
        if dtypes[name] not in FLOAT_DTYPES:
            raise PluginError(f"{ONNX_OP}: {name} must be a float tensor, got {dtypes[name]}")
    if dtypes["key_padding_mask"] != "bool":
        raise PluginError(f"{ONNX_OP}: key_padding_mask must be bool, got {dtypes['key_padding_mask']}")

    def same(label, *dims):
        known = {d for d in dims if d is not None}
        if len(known) > 1:
            raise PluginError(f"{ONNX_OP}: inconsistent {label}: {sorted(known)}")

    q, k, v, qf, kf, kpm, wb = (tuple(shapes[n]) for n in INPUTS)
    same("batch", q[0], k[0], v[0], qf[0], kf[0], kpm[0])
    same("query length", q[1], qf[1])
    same("key length", k[1], v[1], kf[1], kpm[1])
    same("heads", q[2], k[2], v[2], qf[4], kf[4], wb[1], wb[2])
    same("head dim", q[3], k[3], v[3])
    same("factor rows", qf[3], kf[3])
    for dim, value in (("q_factors dim 2", qf[2]), ("k_factors dim 2", kf[2]), ("static_mix dim 0", wb[0])):
        if value is not None and value != 2:
            raise PluginError(f"{ONNX_OP}: {dim} must be 2 (pre, post), got {value}")
    if qf[3] is not None and qf[3] % 2 != 1:
        raise PluginError(f"{ONNX_OP}: factor rows must be 2R+1, got {qf[3]}")
    return q, qd


def kernel_signature(dtypes: Mapping[str, str]) -> dict:
    """Triton signature of :func:`dcmha_attention_fwd` for these input dtypes (the output has q's)."""
    sig = {f"{name}_ptr": "*" + TRITON_TYPES[dtypes[name]] for name in INPUTS}
    sig = {
        "q_ptr": sig["q_ptr"],
        "k_ptr": sig["k_ptr"],
        "v_ptr": sig["v_ptr"],
        "qf_ptr": sig["q_factors_ptr"],
        "kf_ptr": sig["k_factors_ptr"],
        "kpm_ptr": sig["key_padding_mask_ptr"],
        "wb_ptr": sig["static_mix_ptr"],
    }
    sig.update({"T": "i32", "S": "i32", "o_ptr": "*" + TRITON_TYPES[dtypes["q"]]})
    return sig


@dataclass(frozen=True)
class CompiledKernel:
    """What the AOT implementation hands TensorRT, plus what tests check."""

    name: str
    ptx: str
    arch: int
    num_warps: int
    shared: int
    config: Any  # triton_kernel.KernelConfig
    signature: dict

    @property
    def threads(self) -> int:
        return self.num_warps * 32


def default_ptx_version() -> Optional[int]:
    value = os.environ.get("ATTN2ONNX_PTX_VERSION", str(DEFAULT_PTX_VERSION))
    return int(value) or None


def compile_ptx(config: Any, dtypes: Mapping[str, str], arch: int, ptx_version: Optional[int] = -1) -> CompiledKernel:
    """Compile the fused kernel for ``config`` (a ``KernelConfig``) to PTX for ``sm_<arch>``.

    Needs Triton, not a GPU: the target is explicit. ``ptx_version`` -1 = :func:`default_ptx_version`,
    None = Triton's choice. Raises :class:`PluginError` if the compiled kernel needs a launch
    feature TensorRT's AOT path cannot give it (scratch memory, clusters, cooperative launch).
    """
    import triton
    from triton.backends.compiler import GPUTarget

    from .triton_kernel import dcmha_attention_fwd

    if ptx_version == -1:
        ptx_version = default_ptx_version()
    signature = kernel_signature(dtypes)
    source = triton.compiler.ASTSource(
        fn=dcmha_attention_fwd,
        signature={**signature, **{name: "constexpr" for name in NO_MASK}},
        constexprs={**config.constexprs(), **NO_MASK},
    )
    options: dict = {"num_warps": config.num_warps, "num_stages": config.num_stages, "enable_fp_fusion": True}
    if ptx_version:
        options["ptx_version"] = int(ptx_version)
    compiled = triton.compile(source, target=GPUTarget("cuda", int(arch), 32), options=options)
    md = compiled.metadata
    problems = []
    if getattr(md, "global_scratch_size", 0):
        problems.append(f"global scratch {md.global_scratch_size} B")
    if getattr(md, "profile_scratch_size", 0):
        problems.append(f"profile scratch {md.profile_scratch_size} B")
    if getattr(md, "num_ctas", 1) != 1:
        problems.append(f"{md.num_ctas} CTAs per cluster")
    if getattr(md, "launch_cooperative_grid", False) or getattr(md, "launch_pdl", False):
        problems.append("cooperative / PDL launch")
    if getattr(md, "tmem_size", 0):
        problems.append("tensor memory")
    if problems:
        raise PluginError(
            f"{ONNX_OP}: the Triton kernel for sm_{arch} needs {', '.join(problems)}, "
            "which TensorRT AOT plugins cannot provide"
        )
    return CompiledKernel(
        name=md.name,
        ptx=compiled.asm["ptx"],
        arch=int(arch),
        num_warps=md.num_warps,
        shared=md.shared,
        config=config,
        signature=signature,
    )


_PARAM = re.compile(r"\.param\s+\.(\w+)(?:\s+\.ptr)?(?:\s+\.global)?(?:\s+\.align\s+\d+)?\s+(\w+)")


def ptx_entry_params(ptx: str, name: str) -> list:
    """[(ptx type, is_pointer)] of the ``.entry name(...)`` parameter list in ``ptx``."""
    match = re.search(r"\.entry\s+" + re.escape(name) + r"\s*\((.*?)\)", ptx, re.S)
    if match is None:
        raise PluginError(f"no .entry {name} in the PTX")
    params = []
    for line in match.group(1).split(","):
        line = line.strip()
        if not line:
            continue
        m = _PARAM.search(line)
        if m is None:
            raise PluginError(f"cannot parse PTX parameter {line!r}")
        params.append((m.group(1), ".ptr" in line))
    return params


def target_arch() -> int:
    """The compute capability to compile for: ATTN2ONNX_TRT_ARCH, else the current CUDA device,
    else 80 (PTX for sm_80 also JIT-compiles on newer GPUs)."""
    value = os.environ.get("ATTN2ONNX_TRT_ARCH")
    if value:
        return int(value.lower().removeprefix("sm_").rstrip("a"))
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return major * 10 + minor
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return 80


def plugin_config(
    heads: int, head_dim: int, rank: int, dtype: str, scale: float, causal: int, window: int, use_static_mix: int
) -> Any:
    """The kernel configuration of one node: the same one the torch CUDA dispatch would use."""
    from .triton_kernel import config_for

    try:
        return config_for(heads, head_dim, rank, dtype, scale, bool(causal), int(window), bool(use_static_mix))
    except ValueError as err:
        raise PluginError(str(err)) from err


def _constant(expr: Any, what: str) -> int:
    """The build-time value of a TensorRT shape expression that must be constant."""
    if isinstance(expr, int):
        return expr
    try:
        if expr.is_constant:
            return int(expr.constant_value)
    except Exception:  # noqa: BLE001 - fall back to the underlying IDimensionExpr
        inner = getattr(expr, "_expr", None)
        if inner is not None and inner.is_constant():
            return int(inner.get_constant_value())
    raise PluginError(f"{ONNX_OP}: {what} must be static to build the TensorRT plugin")


def _dtype_name(trt_dtype: Any) -> str:
    import tensorrt as trt

    names = {trt.float32: "float32", trt.float16: "float16", trt.bfloat16: "bfloat16", trt.bool: "bool"}
    if trt_dtype not in names:
        raise PluginError(f"{ONNX_OP}: unsupported TensorRT dtype {trt_dtype}")
    return names[trt_dtype]


def aot_launch(
    trtp: Any,
    descs: Sequence[Any],
    dtypes: Mapping[str, str],
    scale: float,
    causal: int,
    window: int,
    use_static_mix: int,
    arch: Optional[int] = None,
) -> tuple:
    """Body of the AOT implementation, with ``tensorrt.plugin`` passed in (tests pass a stand-in).

    ``descs`` are the 7 input TensorDescs. Returns (kernel name, PTX, KernelLaunchParams, SymIntExprs).
    """
    q, k, _, qf = descs[0], descs[1], descs[2], descs[3]
    heads = _constant(q.shape_expr[2], "the number of heads (q dim 2)")
    head_dim = _constant(q.shape_expr[3], "the head dim (q dim 3)")
    rows = _constant(qf.shape_expr[3], "the factor rows (q_factors dim 3)")
    config = plugin_config(heads, head_dim, (rows - 1) // 2, dtypes["q"], scale, causal, window, use_static_mix)
    kernel = compile_ptx(config, dtypes, target_arch() if arch is None else arch)
    batch, q_len, k_len = q.shape_expr[0], q.shape_expr[1], k.shape_expr[1]
    launch = trtp.KernelLaunchParams()
    launch.grid_x = trtp.cdiv(q_len, config.block_m)
    launch.grid_y = batch
    launch.grid_z = config.head_groups
    launch.block_x = kernel.threads
    launch.shared_mem = kernel.shared
    extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(q_len), trtp.SymInt32(k_len)])
    return kernel.name.encode(), kernel.ptx.encode(), launch, extra


_REGISTERED = False


def register() -> str:
    """Register the plugin with TensorRT (once per process); returns its id.

    Raises ImportError where tensorrt (or its ``tensorrt.plugin`` module) is missing.
    """
    global _REGISTERED
    if _REGISTERED:
        return PLUGIN_ID
    import tensorrt.plugin as trtp

    @trtp.register(PLUGIN_ID)
    def dcmha_attention_desc(
        q: trtp.TensorDesc,
        k: trtp.TensorDesc,
        v: trtp.TensorDesc,
        q_factors: trtp.TensorDesc,
        k_factors: trtp.TensorDesc,
        key_padding_mask: trtp.TensorDesc,
        static_mix: trtp.TensorDesc,
        scale: float,
        causal: int,
        window: int,
        use_static_mix: int,
    ) -> trtp.TensorDesc:
        descs = (q, k, v, q_factors, k_factors, key_padding_mask, static_mix)
        dtypes = {name: _dtype_name(d.dtype) for name, d in zip(INPUTS, descs)}
        # only dtypes and ranks here: TensorRT calls this once with placeholder shapes
        check_io({name: [None] * len(d.shape_expr) for name, d in zip(INPUTS, descs)}, dtypes)
        return q.like()

    @trtp.aot_impl(PLUGIN_ID)
    def dcmha_attention_aot(
        q: trtp.TensorDesc,
        k: trtp.TensorDesc,
        v: trtp.TensorDesc,
        q_factors: trtp.TensorDesc,
        k_factors: trtp.TensorDesc,
        key_padding_mask: trtp.TensorDesc,
        static_mix: trtp.TensorDesc,
        scale: float,
        causal: int,
        window: int,
        use_static_mix: int,
        outputs: Tuple[trtp.TensorDesc],
        tactic: int,
    ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        descs = (q, k, v, q_factors, k_factors, key_padding_mask, static_mix)
        dtypes = {name: _dtype_name(d.dtype) for name, d in zip(INPUTS, descs)}
        return aot_launch(trtp, descs, dtypes, scale, causal, window, use_static_mix)

    _REGISTERED = True
    return PLUGIN_ID


__all__ = [
    "ARCHS",
    "ATTRIBUTES",
    "CompiledKernel",
    "INPUTS",
    "ONNX_OP",
    "PLUGIN_ID",
    "PLUGIN_NAMESPACE",
    "PluginError",
    "aot_launch",
    "check_io",
    "compile_ptx",
    "kernel_signature",
    "plugin_config",
    "ptx_entry_params",
    "register",
    "target_arch",
]
