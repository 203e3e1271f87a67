"""The command line answers without importing torch where it needs none (issue 22 item 1): a
usage error or a missing file, ``--help``, ``variants``, ``doctor``, and ``run``, ``generate``
and ``optimize`` of a graph (its ai.attn2onnx nodes included: the op set's schemas and bodies
load with onnx only). Torch takes seconds to import, so those paths and every argument / file
check run without it. Each case runs ``attn2onnx.cli.main`` in a fresh interpreter and asserts
on its exit status and ``sys.modules``, not on timings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

PROBE = """
import json, sys
from attn2onnx.cli import main
try:
    status = main(sys.argv[1:])
except SystemExit as e:
    status = e.code
print(json.dumps({"status": status, "torch": "torch" in sys.modules}))
"""
# The probe's result is its last stdout line; what the command printed comes before it.


def probe(*argv: str) -> dict:
    """``attn2onnx ARGV`` in a fresh interpreter: its exit status and whether torch got imported."""
    env = dict(os.environ)
    env.pop("ATTN2ONNX_DEBUG", None)
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, env=env, timeout=300, check=True
    )
    *printed, last = done.stdout.strip().splitlines()
    return json.loads(last) | {"stdout": "\n".join(printed), "stderr": done.stderr}


def cases(folder: Path) -> dict[str, tuple[list[str], str]]:
    """Case name -> (argv, the start of its one-line error; "" for a help page)."""
    missing, gone = str(folder / "missing.onnx"), str(folder / "no-such-folder")
    model = folder / "model.pt"
    model.write_bytes(b"not read: the output folder is refused first")
    return {
        "help": (["--help"], ""),
        "run missing model": (["run", missing], "no such file"),
        "run missing inputs": (["run", str(model), "--inputs", f"{gone}/in.npz"], "no such file"),
        "generate missing model": (["generate", missing, "--prompt", "hi"], "no such file"),
        "optimize missing model": (["optimize", missing, "-o", str(folder / "out.onnx")], "no such file"),
        "optimize missing output folder": (["optimize", str(model), "-o", f"{gone}/out.onnx"], "folder"),
        "export missing model": (["export", str(folder / "missing.pt"), "-o", str(folder / "m.onnx")], "no such file"),
        "export missing output folder": (["export", str(model), "-o", f"{gone}/m.onnx"], "folder"),
        "export output not onnx": (["export", str(model), "-o", str(folder / "m.txt")], "output"),
        "new unknown variant": (["new", "foo", "-o", str(folder / "x.pt")], "unknown variant 'foo'"),
        "new missing output folder": (["new", "mha", "-o", f"{gone}/x.pt"], "folder"),
        "convert missing folder": (["convert", gone, "-o", str(folder / "x.pt")], f"{gone} is not a folder"),
        "demo unknown variant": (["demo", "--variants", "mha,foo", "--out", str(folder)], "unknown variant 'foo'"),
        "validate missing model": (["validate", missing, "--reference", str(model)], "no such file"),
    }


CASE_NAMES = [  # the keys of cases() (which needs a folder)
    "help",
    "run missing model",
    "run missing inputs",
    "generate missing model",
    "optimize missing model",
    "optimize missing output folder",
    "export missing model",
    "export missing output folder",
    "export output not onnx",
    "new unknown variant",
    "new missing output folder",
    "convert missing folder",
    "demo unknown variant",
    "validate missing model",
]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_error_paths_do_not_import_torch(tmp_path, name):
    table = cases(tmp_path)
    assert sorted(table) == sorted(CASE_NAMES)
    argv, error = table[name]
    result = probe(*argv)
    if error:
        lines = result["stderr"].strip().splitlines()
        assert result["status"] == 2 and len(lines) == 1, result
        assert lines[0].startswith(f"attn2onnx: error: {error}"), result
    else:
        assert result["status"] == 0, result
    assert not result["torch"], f"{name}: torch imported before the error"


def write_plain_graph(path: Path) -> None:
    """y = x + x over x [batch, seq, 4]: a standard-ops graph that ``run`` takes on random inputs."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 4])
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "add", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]), str(path))


@pytest.fixture(scope="module")
def graphs(tmp_path_factory) -> Path:
    """A folder with add.onnx (standard ops), lm.onnx (a one-layer dcmha LM exported for decode:
    DcmhaAttention nodes and the decode metadata) and in.npz (inputs of add.onnx)."""
    import attn2onnx
    from attn2onnx.models.decode import export_decode

    folder = tmp_path_factory.mktemp("graphs")
    write_plain_graph(folder / "add.onnx")
    np.savez(folder / "in.npz", x=np.ones((2, 3, 4), np.float32))
    config = attn2onnx.ModelConfig(family="lm", variant="dcmha", layers=1, d_model=16, heads=2, max_len=32)
    export_decode(attn2onnx.build_model(config).eval(), folder / "lm.onnx")
    return folder


RESULTS = {  # case -> argv in the graphs folder, and what its output (stdout, stderr) holds (--help: see cases())
    "variants": (["variants"], "dcmha"),
    "doctor": (["doctor"], "DcmhaAttention"),
    "doctor --json": (["doctor", "--json"], '"native_kernels"'),
    "run plain graph": (["run", "add.onnx"], "y: shape [1, 16, 4]"),
    "run plain graph on given inputs": (["run", "add.onnx", "--inputs", "in.npz", "-o", "out.npz"], "wrote out.npz"),
    "run decode graph": (["run", "lm.onnx"], "logits: shape"),
    "generate": (["generate", "lm.onnx", "--prompt", "hi", "--max-new-tokens", "2"], "generated 2 tokens"),
    "optimize graph": (["optimize", "lm.onnx", "-o", "lm.opt.onnx"], "wrote lm.opt.onnx"),
}


@pytest.mark.parametrize("name", list(RESULTS))
def test_commands_that_need_no_torch_answer_without_it(graphs, monkeypatch, name):
    """Each command's first result (exit 0, its output) in a fresh interpreter without torch."""
    monkeypatch.chdir(graphs)
    argv, expected = RESULTS[name]
    result = probe(*argv)
    assert result["status"] == 0, result
    assert expected in result["stdout"] + result["stderr"], result
    assert not result["torch"], f"{name}: torch imported"


def test_op_set_and_runtime_modules_do_not_import_torch():
    """The op set (schemas, bodies, rules, backends), the graph loader, sessions, metadata readers
    and the decode loop import without torch; the torch side loads when asked for."""
    code = (
        "import sys; import attn2onnx.custom_ops as ops, attn2onnx.onnx_io, attn2onnx.runtime, "
        "attn2onnx.runtime.metadata, attn2onnx.runtime.decode_inputs, attn2onnx.generate, attn2onnx.passes; "
        "before = 'torch' in sys.modules; ops.function_protos(); "
        "from attn2onnx.custom_ops.super_mix import super_mix_reference; "
        "import torch; print(before, hasattr(torch.ops.attn2onnx, 'super_mix'), "
        "hasattr(torch.ops.attn2onnx, 'dcmha_attention'), ops.REGISTRY['DcmhaAttention'].torch_op is not None)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.split() == ["False", "True", "False", "True"], out.stderr


def test_parser_and_modules_do_not_import_torch():
    """Building every sub-parser (each command module) and the input-spec module stays torch-free."""
    code = (
        "import sys; from attn2onnx.cli import build_parser; import attn2onnx.io_spec, attn2onnx.variants; "
        "build_parser(); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_variant_listings_match_the_registry():
    """``variants`` lists variants.LISTINGS (torch-free), ``new`` checks names against
    variants.NAMES with get_variant's own words: both say what the registry says."""
    from attn2onnx.variants import LISTINGS, NAMES, VARIANTS, VariantError, check_name, get_variant

    assert list(NAMES) == list(LISTINGS) == list(VARIANTS)
    for name, info in VARIANTS.items():
        listing = LISTINGS[name]
        assert (listing.paper, listing.causal, listing.params, listing.families) == (
            info.paper,
            info.causal,
            info.params,
            info.families,
        ), name
        assert f"attn2onnx.variants.{listing.module}" == info.module_cls.__module__, name
    for name in VARIANTS:
        check_name(name)
    with pytest.raises(VariantError) as ours:
        check_name("foo")
    with pytest.raises(VariantError) as registry:
        get_variant("foo")
    assert str(ours.value) == str(registry.value)
