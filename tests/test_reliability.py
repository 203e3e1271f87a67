"""Reliability and security of the commands against their surroundings: stdin left open, a
shared native-kernel cache, ONNX external data that points outside the model's folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from attn2onnx import cli
from attn2onnx.external_data import ExternalDataError, check_external_data
from attn2onnx.runtime import native

SECRET = b"SECRET-BYTES-OUTSIDE-THE-MODEL-FOLDER-" * 4


def command() -> list[str]:
    exe = shutil.which("attn2onnx")
    return [exe] if exe else [sys.executable, "-m", "attn2onnx"]


def run_with_open_stdin(args: list[str], env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """The command with stdin attached to a pipe that is never closed, as at a terminal or
    behind `sleep 60 |`: a child that reads stdin would wait forever."""
    proc = subprocess.Popen(
        [*command(), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    try:
        out, err = proc.communicate(timeout=timeout)  # communicate() would close stdin: wait instead
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"attn2onnx {' '.join(args)} hung with stdin open")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    assert (
        cli.main(
            [
                "new",
                "mha",
                "-o",
                str(folder / "m.pt"),
                "--layers",
                "1",
                "--d-model",
                "16",
                "--heads",
                "2",
                "--max-len",
                "16",
            ]
        )
        == 0
    )
    assert cli.main(["export", str(folder / "m.pt"), "-o", str(folder / "m.onnx"), "--no-check"]) == 0
    return folder / "m.onnx"


# --- 1. stdin -------------------------------------------------------------------------------
def test_doctor_does_not_read_stdin():
    result = run_with_open_stdin(["doctor"], timeout=240)
    assert result.returncode == 0, result.stderr
    assert "native_kernels" in result.stdout


def test_run_does_not_read_stdin(exported):
    result = run_with_open_stdin(["run", str(exported), "--seq-len", "4"], timeout=240)
    assert result.returncode == 0, result.stderr
    assert "ran in" in result.stdout


def test_compiler_children_get_no_stdin(monkeypatch):
    seen = []

    def fake_run(cmd, **kwargs):
        seen.append(kwargs.get("stdin"))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(native.subprocess, "run", fake_run)
    native._native_target.cache_clear()
    try:
        native._native_target(("g++",))
    finally:
        native._native_target.cache_clear()
    assert seen and all(s is subprocess.DEVNULL for s in seen)


# --- 9. a planted native library ------------------------------------------------------------
PLANT_C = """
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen("%s", "w"); if (f) { fputs("ran", f); fclose(f); }
}
"""


def plant_library(path: Path, marker: Path) -> None:
    if shutil.which("gcc") is None:
        pytest.skip("no C compiler to build a planted library with")
    path.parent.mkdir(parents=True, exist_ok=True)
    src = path.parent / "planted.c"
    src.write_text(PLANT_C % marker)
    subprocess.run(["gcc", "-shared", "-fPIC", str(src), "-o", str(path)], check=True, stdin=subprocess.DEVNULL)
    src.unlink()


@pytest.mark.parametrize("how", ["world_writable_root", "foreign_owner", "group_writable_file", "symlink"])
def test_planted_library_is_not_loaded(tmp_path, how):
    if not native.available():
        pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}")
    root = tmp_path / "cache"
    root.mkdir(mode=0o700)
    marker = tmp_path / "marker"
    env = {"ATTN2ONNX_CACHE_DIR": str(root)}
    saved = os.environ.get("ATTN2ONNX_CACHE_DIR")
    os.environ["ATTN2ONNX_CACHE_DIR"] = str(root)
    try:
        target = native.library_target()
    finally:
        if saved is None:
            del os.environ["ATTN2ONNX_CACHE_DIR"]
        else:
            os.environ["ATTN2ONNX_CACHE_DIR"] = saved
    if how == "symlink":
        elsewhere = tmp_path / "elsewhere" / native.LIBRARY_NAME
        plant_library(elsewhere, marker)
        target.parent.mkdir(parents=True, mode=0o700)
        target.symlink_to(elsewhere)
    else:
        plant_library(target, marker)
    if how == "world_writable_root":
        root.chmod(0o777)
    elif how == "foreign_owner":
        if os.geteuid() != 0:
            pytest.skip("giving a folder to another user needs root")
        os.chown(target.parent, 65534, 65534)
    elif how == "group_writable_file":
        target.chmod(0o775)
    result = run_with_open_stdin(["doctor"], env=env, timeout=240)
    assert not marker.exists(), "the planted library's constructor ran"
    assert "refusing the native kernel cache" in result.stdout, result.stdout


def test_private_cache_is_created_private(tmp_path, monkeypatch):
    root = tmp_path / "fresh" / "cache"
    monkeypatch.setenv("ATTN2ONNX_CACHE_DIR", str(root))
    folder = root / "native" / "abc"
    native._private_dirs(folder, root)
    for level in (root, root / "native", folder):
        assert oct(level.stat().st_mode & 0o077) == "0o0", level
    native.check_private(folder, root)


# --- 3. external data outside the model's folder --------------------------------------------
def model_with_external(folder: Path, location: str, offset: int = 0, length: int | None = None) -> Path:
    """A one-initializer model (y = x + w) whose w lies in external data at ``location``."""
    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4])
    w.data_location = TensorProto.EXTERNAL
    entries = {"location": location, "offset": str(offset), "length": str(16 if length is None else length)}
    for key, value in entries.items():
        w.external_data.add(key=key, value=value)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "x.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture
def secret(tmp_path) -> Path:
    path = tmp_path / "secret.bin"
    path.write_bytes(SECRET)
    return path


def escapes(tmp_path: Path, secret: Path) -> dict[str, Path]:
    inner = tmp_path / "a" / "b"
    inner.mkdir(parents=True)
    (inner / "link.bin").symlink_to(secret)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "own.bin").write_bytes(b"\0" * 16)
    return {
        "parent": model_with_external(inner, "../../secret.bin"),
        "absolute": model_with_external(tmp_path / "c", str(secret)),
        "symlink": model_with_external(inner, "link.bin"),
        "past_end": model_with_external(tmp_path / "d", "own.bin", offset=8, length=16),
        "missing": model_with_external(tmp_path / "e", "nothing.bin"),
    }


@pytest.mark.parametrize("kind", ["parent", "absolute", "symlink", "past_end", "missing"])
def test_external_data_escape_refused_by_every_command(tmp_path, secret, capsys, kind):
    model = escapes(tmp_path, secret)[kind]
    out = model.parent / "out.onnx"
    for args in (
        ["optimize", str(model), "-o", str(out)],
        ["run", str(model), "-o", str(model.parent / "o.npz")],
        ["validate", str(model), "--reference", str(tmp_path / "unused.pt")],
    ):
        status = cli.main(args)
        err = capsys.readouterr().err
        assert status == 2, (args, err)
        assert len(err.strip().splitlines()) == 1 and "external data" in err, err
    assert not out.exists() and not (model.parent / "o.npz").exists()
    assert not any(SECRET[:16] in p.read_bytes() for p in model.parent.rglob("*") if p.is_file() and not p.is_symlink())


def test_external_data_inside_the_folder_is_accepted(tmp_path):
    values = np.arange(4, dtype=np.float32)
    (tmp_path / "w.bin").write_bytes(b"\0" * 8 + values.tobytes())
    path = model_with_external(tmp_path, "w.bin", offset=8, length=16)
    check_external_data(onnx.load(str(path), load_external_data=False), path)
    out = tmp_path / "out.onnx"
    assert cli.main(["optimize", str(path), "-o", str(out), "--target", "portable"]) == 0
    loaded = onnx.load(str(out))
    np.testing.assert_array_equal(
        numpy_helper.to_array(next(i for i in loaded.graph.initializer if i.name == "w")), values
    )


def test_external_data_in_a_function_constant_is_checked(tmp_path, secret):
    model = onnx.load(str(model_with_external(tmp_path / "f", "own.bin")), load_external_data=False)
    (tmp_path / "f" / "own.bin").write_bytes(b"\0" * 16)
    const = TensorProto(name="c", data_type=TensorProto.FLOAT, dims=[1])
    const.data_location = TensorProto.EXTERNAL
    const.external_data.add(key="location", value="../secret.bin")
    fn = helper.make_function(
        "custom",
        "F",
        ["a"],
        ["b"],
        [helper.make_node("Constant", [], ["b"], value=const)],
        [helper.make_opsetid("", 23)],
    )
    model.functions.append(fn)
    with pytest.raises(ExternalDataError, match="outside the model's folder"):
        check_external_data(model, tmp_path / "f" / "x.onnx")
