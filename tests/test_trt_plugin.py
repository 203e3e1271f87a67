"""TensorRT path without TensorRT or a GPU: the DcmhaAttention plugin's shape/dtype logic, PTX
generated on the CPU for sm_80 and sm_90 (entry name, parameter list, ptxas accepts it), the
AOT launch description against a stand-in of ``tensorrt.plugin``, the clean failure where
TensorRT is missing, and the ``trt`` pass that tags plugin nodes."""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from conftest import skip_or_fail
from onnx import TensorProto

from attn2onnx.custom_ops.dcmha_attention import trt_plugin as tp
from attn2onnx.passes.trt_plugins import TrtNameClash, TrtPluginPass, tag_trt_plugins
from attn2onnx.runtime import tensorrt as rt

HAVE_TRITON = importlib.util.find_spec("triton") is not None
HAVE_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def needs_triton(test):
    """Run ``test`` where Triton is installed (the test extra installs it: under CI its absence fails)."""

    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        if not HAVE_TRITON:
            skip_or_fail("triton is not installed")
        return test(*args, **kwargs)

    return wrapper


DTYPES = {
    "q": "float16",
    "k": "float16",
    "v": "float16",
    "q_factors": "float16",
    "k_factors": "float16",
    "key_padding_mask": "bool",
    "static_mix": "float16",
}


def shapes(B=2, T=7, S=9, N=4, d=16, R=2):
    return {
        "q": (B, T, N, d),
        "k": (B, S, N, d),
        "v": (B, S, N, d),
        "q_factors": (B, T, 2, 2 * R + 1, N),
        "k_factors": (B, S, 2, 2 * R + 1, N),
        "key_padding_mask": (B, S),
        "static_mix": (2, N, N),
    }


# ------------------------------------------------------------------ shape / dtype logic
def test_check_io_output_is_q_shape_and_dtype():
    assert tp.check_io(shapes(), DTYPES) == ((2, 7, 4, 16), "float16")
    dynamic = {n: tuple(None if i < 2 else d for i, d in enumerate(s)) for n, s in shapes().items()}
    assert tp.check_io(dynamic, dict(DTYPES, q="bfloat16", k="bfloat16", v="bfloat16"))[1] == "bfloat16"


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(dtypes={"k": "float32"}), "k must have q's dtype"),
        (dict(dtypes={"key_padding_mask": "float16"}), "key_padding_mask must be bool"),
        (dict(dtypes={"q": "bool", "k": "bool", "v": "bool"}), "q must be float32"),
        (dict(shapes={"v": (2, 8, 4, 16)}), "key length"),
        (dict(shapes={"static_mix": (2, 3, 3)}), "heads"),
        (dict(shapes={"q_factors": (2, 7, 2, 4, 4), "k_factors": (2, 9, 2, 4, 4)}), "2R\\+1"),
        (dict(shapes={"key_padding_mask": (2, 9, 1)}), "rank 2"),
    ],
)
def test_check_io_rejects(change, message):
    s, d = shapes(), dict(DTYPES)
    s.update(change.get("shapes", {}))
    d.update(change.get("dtypes", {}))
    with pytest.raises(tp.PluginError, match=message):
        tp.check_io(s, d)


def test_kernel_signature_follows_trt_aot_convention():
    sig = tp.kernel_signature(dict(DTYPES, static_mix="float32"))
    assert list(sig) == ["q_ptr", "k_ptr", "v_ptr", "qf_ptr", "kf_ptr", "kpm_ptr", "wb_ptr", "T", "S", "o_ptr"]
    assert sig["q_ptr"] == sig["o_ptr"] == "*fp16" and sig["kpm_ptr"] == "*i1" and sig["wb_ptr"] == "*fp32"
    assert sig["T"] == sig["S"] == "i32"


def test_plugin_id_has_no_dot_in_namespace():
    # tensorrt.plugin refuses '.' in namespaces; the ONNX domain stays ai.attn2onnx
    namespace, name = tp.PLUGIN_ID.split("::")
    assert "." not in namespace and name == "DcmhaAttention" == tp.ONNX_OP


# ------------------------------------------------------------------ PTX on the CPU
def _ptxas():
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return path if os.path.isfile(path) else None


def _assert_ptx(kernel, arch, signature_len=10):
    params = tp.ptx_entry_params(kernel.ptx, kernel.name)
    # 7 input pointers, T and S, the output pointer, then Triton's two scratch pointers
    assert [p for p, _ in params[:signature_len]] == ["u64"] * 7 + ["u32", "u32"] + ["u64"]
    assert [ptr for _, ptr in params[:signature_len]] == [True] * 7 + [False, False] + [True]
    assert len(params) - signature_len <= 2 and all(ptr for _, ptr in params[signature_len:])
    assert f".target sm_{arch}" in kernel.ptx and ".version 8.5" in kernel.ptx
    assert kernel.threads == kernel.num_warps * 32 and kernel.shared >= 0


@needs_triton
@pytest.mark.parametrize("arch", tp.ARCHS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_ptx_for_each_arch(arch, dtype):
    dtypes = {n: ("bool" if n == "key_padding_mask" else dtype) for n in tp.INPUTS}
    config = tp.plugin_config(4, 16, 2, dtype, 0.0, 1, 0, 1)
    kernel = tp.compile_ptx(config, dtypes, arch)
    assert kernel.name == "dcmha_attention_fwd" and kernel.arch == arch
    _assert_ptx(kernel, arch)
    ptxas = _ptxas()
    if ptxas is None:
        skip_or_fail("Triton ships no ptxas here")
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"dcmha_{arch}_{dtype}_{os.getpid()}.ptx")
    with open(path, "w") as f:
        f.write(kernel.ptx)
    try:
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        proc = subprocess.run([ptxas, f"--gpu-name={gpu}", path, "-o", os.devnull], capture_output=True, text=True)
    finally:
        os.unlink(path)
    assert proc.returncode == 0, proc.stderr


@needs_triton
def test_ptx_at_published_size():
    """DCFormer-2.8B attention (N 32, d 80, window 256) for sm_90: compiles, no scratch, head groups."""
    dtypes = {n: ("bool" if n == "key_padding_mask" else "bfloat16") for n in tp.INPUTS}
    config = tp.plugin_config(32, 80, 2, "bfloat16", 0.0, 1, 256, 0)
    kernel = tp.compile_ptx(config, dtypes, 90)
    _assert_ptx(kernel, 90)
    assert config.head_groups == 4 and kernel.num_warps == 8


def test_target_arch_from_environment(monkeypatch):
    monkeypatch.setenv("ATTN2ONNX_TRT_ARCH", "sm_90a")
    assert tp.target_arch() == 90
    monkeypatch.setenv("ATTN2ONNX_TRT_ARCH", "80")
    assert tp.target_arch() == 80


# ------------------------------------------------------------------ AOT launch, stand-in trtp
class FakeExpr:
    """Just enough of tensorrt.plugin's ShapeExpr / SymInt32 for aot_launch."""

    def __init__(self, value, constant=True, label=None):
        self.value, self.is_constant, self.label = value, constant, label

    @property
    def constant_value(self):
        assert self.is_constant
        return self.value

    def __repr__(self):
        return self.label or str(self.value)


class FakeDesc:
    def __init__(self, dims):
        self.shape_expr = [d if isinstance(d, FakeExpr) else FakeExpr(d) for d in dims]


class FakeTrtp:
    class KernelLaunchParams:
        grid_x = grid_y = grid_z = block_x = shared_mem = None

    class SymInt32:
        def __init__(self, expr):
            self.expr = expr

    class SymIntExprs(tuple):
        @classmethod
        def from_tuple(cls, items):
            return cls(items)

    @staticmethod
    def cdiv(expr, block):
        return ("cdiv", expr, block)


@needs_triton
def test_aot_launch_description():
    B, T, S = FakeExpr(-1, False, "B"), FakeExpr(-1, False, "T"), FakeExpr(-1, False, "S")
    descs = [
        FakeDesc(s)
        for s in ([B, T, 4, 16], [B, S, 4, 16], [B, S, 4, 16], [B, T, 2, 5, 4], [B, S, 2, 5, 4], [B, S], [2, 4, 4])
    ]
    name, ptx, launch, extra = tp.aot_launch(FakeTrtp, descs, DTYPES, 0.0, 1, 0, 0, arch=80)
    assert name == b"dcmha_attention_fwd" and ptx.startswith(b"//") and b".entry dcmha_attention_fwd" in ptx
    assert launch.grid_x == ("cdiv", T, 16) and launch.grid_y is B and launch.grid_z == 1
    assert launch.block_x == 128 and launch.shared_mem >= 0
    assert [e.expr for e in extra] == [T, S]


def test_aot_launch_needs_static_heads():
    descs = [FakeDesc([1, 4, FakeExpr(-1, False), 16])] + [FakeDesc([1])] * 6
    with pytest.raises(tp.PluginError, match="heads"):
        tp.aot_launch(FakeTrtp, descs, DTYPES, 0.0, 1, 0, 0, arch=80)


# ------------------------------------------------------------------ TensorRT missing
@pytest.mark.skipif(HAVE_TENSORRT, reason="TensorRT is installed here")
def test_missing_tensorrt_is_a_clean_usage_error(tmp_path):
    from attn2onnx.errors import UsageError

    assert rt.available() is False
    with pytest.raises(ImportError):
        tp.register()
    with pytest.raises(rt.TensorRTUnavailable, match="TensorRT is not installed") as info:
        rt.build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", {})
    assert isinstance(info.value, UsageError)
    with pytest.raises(rt.TensorRTUnavailable):
        rt.TrtSession(tmp_path / "m.engine")
    onnx.save(one_node_model(), tmp_path / "m.onnx")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "attn2onnx",
            "build-engine",
            str(tmp_path / "m.onnx"),
            "-o",
            str(tmp_path / "e"),
            "--dim",
            "B=1,2,4",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "TensorRT is not installed" in proc.stderr


def test_shape_arguments(tmp_path):
    from attn2onnx.commands.build_engine import parse_range, parse_shape
    from attn2onnx.errors import UsageError

    assert parse_range("1,128,2048") == (1, 128, 2048) and parse_range("64") == (64, 64, 64)
    assert parse_shape("q=1x4x2x8,2x16x2x8,4x64x2x8") == ("q", ((1, 4, 2, 8), (2, 16, 2, 8), (4, 64, 2, 8)))
    for bad in ("4,2,8", "x", "1,2"):
        with pytest.raises(UsageError):
            parse_range(bad)
    path = tmp_path / "one.onnx"
    onnx.save(one_node_model(), path)
    ranges = rt.shapes_from_dims(path, {"B": (1, 2, 4), "T": (1, 8, 64), "S": (1, 8, 64)})
    assert ranges["q"] == ((1, 1, 4, 16), (2, 8, 4, 16), (4, 64, 4, 16))
    assert ranges["static_mix"] == ((2, 4, 4),) * 3
    with pytest.raises(ValueError, match="--dim S"):
        rt.shapes_from_dims(path, {"B": 1, "T": 4})


def test_plugin_discovery():
    assert rt.plugin_ops() == {"DcmhaAttention": "attn2onnx"}


# ------------------------------------------------------------------ the trt pass
def one_node_model(extra_nodes=(), functions=()):
    f, b = TensorProto.FLOAT, TensorProto.BOOL
    inputs = [
        oh.make_tensor_value_info(n, t, s)
        for n, t, s in [
            ("q", f, ["B", "T", 4, 16]),
            ("k", f, ["B", "S", 4, 16]),
            ("v", f, ["B", "S", 4, 16]),
            ("q_factors", f, ["B", "T", 2, 5, 4]),
            ("k_factors", f, ["B", "S", 2, 5, 4]),
            ("key_padding_mask", b, ["B", "S"]),
            ("static_mix", f, [2, 4, 4]),
        ]
    ]
    node = oh.make_node(
        "DcmhaAttention",
        [i.name for i in inputs],
        ["o"],
        domain="ai.attn2onnx",
        scale=0.0,
        causal=1,
        window=0,
        use_static_mix=0,
    )
    outputs = [oh.make_tensor_value_info("o", f, ["B", "T", 4, 16])]
    for extra in extra_nodes:
        outputs.append(oh.make_tensor_value_info(extra.output[0], f, None))
    graph = oh.make_graph([node, *extra_nodes], "one_dcmha", inputs, outputs)
    opsets = [oh.make_opsetid("", 23), oh.make_opsetid("ai.attn2onnx", 1), oh.make_opsetid("custom", 1)]
    return oh.make_model(graph, opset_imports=opsets, functions=list(functions))


def test_pass_tags_plugin_nodes_only():
    other = oh.make_node("SuperMix", ["q", "q", "key_padding_mask"], ["u"], domain="ai.attn2onnx", causal=0)
    standard = oh.make_node("Attention", ["q", "k", "v"], ["y"])  # ONNX Attention-23: TensorRT's own, fine
    model = one_node_model([other, standard])
    p = TrtPluginPass()
    tagged = tag_trt_plugins(model)
    attrs = {n.op_type: {a.name: oh.get_attribute_value(a) for a in n.attribute} for n in tagged.graph.node}
    assert attrs["DcmhaAttention"]["plugin_namespace"] == b"attn2onnx"
    assert "plugin_namespace" not in attrs["SuperMix"] and "plugin_namespace" not in attrs["Attention"]
    assert "aot" not in attrs["DcmhaAttention"]
    import onnx_ir as ir

    irm = ir.serde.deserialize_model(model)
    assert p(irm).modified and p.counts == {"tagged": 1, "function_body": 1}
    assert not TrtPluginPass()(irm).modified  # idempotent
    aot = tag_trt_plugins(model, aot=True)
    assert {a.name: oh.get_attribute_value(a) for a in aot.graph.node[0].attribute}["aot"] == 1


@pytest.mark.parametrize(
    "domain, name",
    [
        ("custom", "Attention"),
        ("ai.attn2onnx", "RMSNormalization"),
        ("custom", "RotaryEmbedding"),
        ("custom", "TRT_Whatever"),
    ],
)
def test_pass_refuses_names_of_trt_builtins(domain, name):
    clash = oh.make_node(name, ["q"], ["z"], domain=domain)
    with pytest.raises(TrtNameClash, match=name):
        tag_trt_plugins(one_node_model([clash]))


def test_pass_refuses_function_named_like_builtin():
    body = oh.make_function(
        "custom", "TRT_Mix", ["x"], ["y"], [oh.make_node("Identity", ["x"], ["y"])], [oh.make_opsetid("", 23)]
    )
    with pytest.raises(TrtNameClash, match="function custom::TRT_Mix"):
        tag_trt_plugins(one_node_model(functions=[body]))


def test_tagged_model_passes_onnx_checker():
    import attn2onnx.custom_ops  # noqa: F401  (registers the schemas)

    schema = onnx.defs.get_schema("DcmhaAttention", 1, "ai.attn2onnx")
    assert "plugin_namespace" in schema.attributes
    onnx.checker.check_model(tag_trt_plugins(one_node_model()), full_check=True)


def test_trt_target_on_exported_dcmha_model():
    """A real export (DCMHA layer) through the ``trt`` pipeline: every DcmhaAttention node tagged."""
    from attn2onnx.exporter import to_onnx
    from attn2onnx.models import ModelConfig, build_model
    from attn2onnx.passes import optimize_model
    from attn2onnx.sources import from_module

    model = build_model(ModelConfig(family="layer", variant="dcmha", d_model=32, heads=4, max_len=64))
    source = from_module(model)
    proto = to_onnx(
        model, source.example_inputs(2, 8), source.specs, output_names=source.output_names, max_seq=source.max_seq
    )
    optimized, report = optimize_model(proto, target="trt")
    nodes = [n for n in optimized.graph.node if n.op_type == "DcmhaAttention"]
    assert nodes
    for node in nodes:
        attrs = {a.name: oh.get_attribute_value(a) for a in node.attribute}
        assert attrs["plugin_namespace"] == b"attn2onnx"
    assert any(f.name == "DcmhaAttention" for f in optimized.functions)  # body kept as the fallback
    np.testing.assert_equal(len(nodes), sum(1 for n in proto.graph.node if n.op_type == "DcmhaAttention"))
