"""One registry per op (issue 13): ``OpDef`` declares an op's torch op (its signature written once,
on the reference), body, translation and backends, and the native build, the TensorRT plugin
registration, the trt target and ``attn2onnx doctor`` all read that one registry. Also: the
models package imports without a cycle."""

from __future__ import annotations

import ast
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

import attn2onnx
from attn2onnx import custom_ops
from attn2onnx.cli import main
from attn2onnx.runtime import native
from attn2onnx.runtime.tensorrt import plugin_modules

ROOT = Path(__file__).resolve().parent.parent
OPS_DIR = native.custom_ops_dir()


def declared(attribute: str) -> list:
    """The backends of one kind that the registry's ops declare, sorted."""
    return sorted(
        getattr(op.backends, attribute)
        for op in custom_ops.REGISTRY.values()
        if getattr(op.backends, attribute) is not None
    )


def test_native_build_compiles_the_kernels_the_registry_declares():
    """The torch-free reading of the op folders' backends.py agrees with the registry, and no
    kernel.cc lies in an op folder undeclared (it would silently drop out of the library)."""
    assert native.kernel_sources() == declared("kernel_source") == sorted(OPS_DIR.glob("*/kernel.cc"))
    assert native.sources() == sorted((OPS_DIR / "native").glob("*.cc")) + declared("kernel_source")


def test_native_build_needs_no_torch():
    code = (
        "import sys\nfrom attn2onnx.runtime import native\nnative.sources()\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_plugins_and_triton_kernels_come_from_the_registry():
    modules = {
        path.stem: sorted(f"{custom_ops.__name__}.{p.parent.name}.{p.stem}" for p in OPS_DIR.glob(f"*/{path}"))
        for path in (Path("trt_plugin.py"), Path("triton_kernel.py"))
    }
    assert plugin_modules() == declared("trt_plugin_module") == modules["trt_plugin"]
    assert declared("triton_module") == modules["triton_kernel"]


@pytest.mark.parametrize("name", sorted(custom_ops.REGISTRY))
def test_torch_op_signature_is_the_reference_signature(name):
    """The torch op is made from the reference itself, so its schema has the reference's arguments."""
    opdef = custom_ops.REGISTRY[name]
    reference = custom_ops.decompositions()[opdef.overload_packet]
    schema_args = [arg.name for arg in opdef.overload_packet._schema.arguments]
    assert schema_args == list(inspect.signature(reference).parameters)


def test_doctor_lists_each_ops_backends(capsys):
    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for kind, check in {"native": "native_kernels", "triton": "triton", "tensorrt": "tensorrt"}.items():
        assert report[check]["ops"] == sorted(n for n, op in custom_ops.REGISTRY.items() if kind in op.backends.names())
    assert report["native_kernels"]["ops"] == ["CacheUpdate", "DcmhaAttention", "StandardAttention"]
    assert report["native_kernels"]["usable"] == native.available()
    assert main(["doctor"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in lines if line.startswith("  ")}
    assert set(rows) == set(custom_ops.REGISTRY)
    assert "native" in rows["DcmhaAttention"] and rows["SuperMix"].split()[1:] == ["-"]


def test_models_config_imports_no_family():
    """config.py is a leaf of the models package: build.py imports it and the families, not the
    other way round (no import cycle)."""
    tree = ast.parse((ROOT / "attn2onnx" / "models" / "config.py").read_text())
    relative = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1}
    assert relative == set()
    assert attn2onnx.build_model.__module__ == "attn2onnx.models.build"
