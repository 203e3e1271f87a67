"""The command line answers a usage error or a missing file without importing torch (issue 22
item 1): torch, the op set and onnxscript take seconds to import, so the torch-free paths and
every argument / file check run before them. Each case runs ``attn2onnx.cli.main`` in a fresh
interpreter (torch-free, so each costs a fraction of a second) and asserts on ``sys.modules``,
not on timings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import json, sys
from attn2onnx.cli import main
try:
    status = main(sys.argv[1:])
except SystemExit as e:
    status = e.code
print(json.dumps({"status": status, "torch": "torch" in sys.modules}))
"""


def probe(*argv: str) -> dict:
    """``attn2onnx ARGV`` in a fresh interpreter: its exit status and whether torch got imported."""
    env = dict(os.environ)
    env.pop("ATTN2ONNX_DEBUG", None)
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, env=env, timeout=120, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1]) | {"stderr": done.stderr}


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


def test_parser_and_modules_do_not_import_torch():
    """Building every sub-parser (each command module) and the input-spec module stays torch-free."""
    code = (
        "import sys; from attn2onnx.cli import build_parser; import attn2onnx.io_spec, attn2onnx.variants; "
        "build_parser(); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_variant_names_match_the_registry():
    """``new`` checks names against variants.NAMES (torch-free) with get_variant's own words."""
    from attn2onnx.variants import NAMES, VARIANTS, VariantError, check_name, get_variant

    assert list(NAMES) == list(VARIANTS)
    for name in VARIANTS:
        check_name(name)
    with pytest.raises(VariantError) as ours:
        check_name("foo")
    with pytest.raises(VariantError) as registry:
        get_variant("foo")
    assert str(ours.value) == str(registry.value)
