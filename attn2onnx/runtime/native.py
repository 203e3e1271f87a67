"""The native ONNX Runtime CPU kernel library (``ai.attn2onnx`` op kernels, C++).

The library is compiled on first use, on the machine that runs it, from the sources shipped with
the package (``custom_ops/native/*.cc`` and the kernel each op declares in ``backends.py``) against ONNX
Runtime's C/C++ API headers, and cached. Because it is built where it runs, it is compiled for
that CPU (``-march=native``: AVX2 / AVX-512 micro-kernels); the cache key holds the resolved
target, the compiler, the flags and the sources, so a shared cache never hands one CPU another's
build. Numerics stay IEEE (no ``-ffast-math``); ``-ffp-contract=fast`` lets multiply-adds fuse.

ORT's pip wheels ship no headers: ``bash scripts/fetch_ort_headers.sh`` fetches Debian's
``libonnxruntime-dev`` into ``build/ort-headers`` (nothing is installed), or point
``ATTN2ONNX_ORT_INCLUDE`` at a folder holding ``onnxruntime_c_api.h``.

Environment:
    ATTN2ONNX_ORT_INCLUDE   folder with onnxruntime_c_api.h / _cxx_api.h
    ATTN2ONNX_NATIVE_LIB    use this prebuilt library instead of building one
    ATTN2ONNX_CACHE_DIR     cache root (default $XDG_CACHE_HOME/attn2onnx or ~/.cache/attn2onnx)
    CXX                     the C++ compiler (default g++)
    ATTN2ONNX_DCMHA_SCRATCH_BYTES  per-thread scratch budget of the DcmhaAttention kernel (default 20 MiB)

    python -m attn2onnx.runtime.native [--vec-report]   builds (if needed) and prints the path
    python -m attn2onnx.runtime.native --sanitize       the same for the sanitizer build (below)

The sanitizer build (:func:`build_sanitized`, cached apart from the regular one: its flags are in
the key) is the library with AddressSanitizer and UndefinedBehaviorSanitizer, every report fatal.
It loads only into a process that has the sanitizer runtime first: run Python with
``LD_PRELOAD="$(python -m attn2onnx.runtime.native --sanitizer-preload)"`` (and
``ASAN_OPTIONS=detect_leaks=0``: the interpreter itself leaks by design) and point
``ATTN2ONNX_NATIVE_LIB`` at it, or register it in a session yourself.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import re
import runpy
import shlex
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

LIBRARY_NAME = "libattn2onnx_ort.so"
HEADERS = ("onnxruntime_c_api.h", "onnxruntime_cxx_api.h")
CXXFLAGS = [
    "-std=gnu++17",
    "-O3",
    "-march=native",
    "-ffp-contract=fast",
    "-fPIC",
    "-shared",
    "-fvisibility=hidden",
    "-fvisibility-inlines-hidden",
    "-pthread",
]
# The sanitizer build: -O0 compiles in a third of -O1's time, and the tests it serves are tiny.
SANITIZER_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-O0", "-g"]
SANITIZER_RUNTIMES = ("libasan.so", "libubsan.so")  # what the sanitizer build needs loaded first


class NativeBuildError(RuntimeError):
    """The kernel library could not be found or built; the message says what to do."""


def custom_ops_dir() -> Path:
    """The folder of the ``attn2onnx.custom_ops`` package (without importing it: no onnx, onnxscript)."""
    spec = importlib.util.find_spec("attn2onnx.custom_ops")
    if spec is None or not spec.submodule_search_locations:
        raise NativeBuildError("attn2onnx.custom_ops is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def kernel_sources() -> list[Path]:
    """Each op's C++ kernel, as ``KERNEL_SOURCE`` in its folder's ``backends.py`` declares it
    (``OpDef.backends.kernel_source``). The declarations are read by path, not imported: the op
    set loads onnx and onnxscript, which building a C++ library does not need."""
    found = []
    for declaration in sorted(custom_ops_dir().glob("*/backends.py")):
        source = runpy.run_path(str(declaration)).get("KERNEL_SOURCE")
        if source:
            found.append(declaration.parent / source)
    return found


def sources() -> list[Path]:
    """Every C++ source of the library: the shared ``custom_ops/native/*.cc`` and each op's kernel."""
    return sorted((custom_ops_dir() / "native").glob("*.cc")) + kernel_sources()


def cache_dir() -> Path:
    """The cache root (not created here)."""
    base = os.environ.get("ATTN2ONNX_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "attn2onnx"
    )
    return Path(base)


def _private_dirs(folder: Path, root: Path) -> None:
    """Create ``folder`` (under ``root``) level by level as 0700 where missing."""
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    for level in [*reversed([p for p in folder.parents if root in p.parents]), folder]:
        if not level.exists():
            level.mkdir(mode=0o700)


def check_private(path: Path, root: Path) -> None:
    """Refuse ``path`` unless it and every folder from the cache ``root`` down to it belong to
    this user (or root), are writable by no one else and are no symlinks: whoever can write
    there can plant a library whose constructor runs in our process when ORT loads it."""
    uid = os.geteuid()
    levels = [root, *reversed([p for p in path.parents if root in p.parents]), path]
    for level in levels:
        try:
            st = os.stat(level) if level == root else os.lstat(level)
        except FileNotFoundError:
            return
        problem = None
        if stat.S_ISLNK(st.st_mode):
            problem = "is a symlink"
        elif st.st_uid not in (uid, 0):
            problem = f"belongs to another user (uid {st.st_uid})"
        elif st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            problem = f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
        if problem:
            raise NativeBuildError(
                f"refusing the native kernel cache: {level} {problem}, so another user could replace the library; "
                "set ATTN2ONNX_CACHE_DIR to a folder only you can write"
            )


def _has_headers(folder: Path) -> bool:
    return all((folder / name).is_file() for name in HEADERS)


def ort_include_dir() -> Path:
    """The folder holding ONNX Runtime's C/C++ API headers, or NativeBuildError saying how to get them."""
    given = os.environ.get("ATTN2ONNX_ORT_INCLUDE")
    if given:
        if _has_headers(Path(given)):
            return Path(given)
        raise NativeBuildError(f"ATTN2ONNX_ORT_INCLUDE={given} does not hold {', '.join(HEADERS)}")
    candidates = [
        custom_ops_dir().parent / "build" / "ort-headers" / "usr" / "include" / "onnxruntime",  # a checkout
        cache_dir() / "ort-headers" / "usr" / "include" / "onnxruntime",
        Path("/usr/include/onnxruntime"),
        Path("/usr/local/include/onnxruntime"),
    ]
    for folder in candidates:
        if _has_headers(folder):
            if cache_dir() in folder.parents:
                for name in HEADERS:
                    check_private(folder / name, cache_dir())
            return folder
    raise NativeBuildError(
        "ONNX Runtime's C/C++ API headers were not found (the onnxruntime pip wheel ships none). "
        "Run `bash scripts/fetch_ort_headers.sh` in an attn2onnx checkout (Debian's libonnxruntime-dev, "
        "unpacked, not installed), or set ATTN2ONNX_ORT_INCLUDE to a folder holding "
        f"{', '.join(HEADERS)} (ONNX Runtime 1.21 or newer). Looked in: " + ", ".join(map(str, candidates))
    )


def header_api_version(include: Path) -> int:
    text = (include / "onnxruntime_c_api.h").read_text(errors="replace")
    match = re.search(r"#define\s+ORT_API_VERSION\s+(\d+)", text)
    if not match:
        raise NativeBuildError(f"{include / 'onnxruntime_c_api.h'} defines no ORT_API_VERSION")
    return int(match.group(1))


def runtime_api_version() -> int:
    """ONNX Runtime 1.x serves C API versions up to x."""
    import onnxruntime

    return int(onnxruntime.__version__.split(".")[1])


def compiler() -> list[str]:
    return shlex.split(os.environ.get("CXX") or "g++")


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run a compiler command with stdin closed: a child that reads stdin (a probe given ``-``)
    must never wait on the caller's terminal or pipe."""
    try:
        return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise NativeBuildError(f"C++ compiler not found ({cmd[0]}): install g++ (or set CXX)") from exc


@functools.lru_cache(maxsize=None)
def _native_target(cxx: tuple[str, ...]) -> str:
    """What -march=native resolves to here (the flags cc1plus gets), plus the compiler version."""
    version = _run([*cxx, "--version"]).stdout.splitlines()[:1]
    probe = _run([*cxx, "-march=native", "-E", "-v", "-x", "c++", os.devnull, "-o", os.devnull])
    target = [line for line in probe.stderr.splitlines() if "cc1plus" in line or "-target-cpu" in line]
    return "\n".join(version + target)


def _build_key(include: Path, srcs: list[Path], flags: list[str]) -> str:
    digest = hashlib.sha256()
    for part in [
        " ".join(compiler()),
        " ".join(flags),
        _native_target(tuple(compiler())),
        str(header_api_version(include)),
    ]:
        digest.update(part.encode() + b"\0")
    for src in srcs + sorted((custom_ops_dir() / "native").glob("*.h")):
        digest.update(src.name.encode() + b"\0" + src.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _checked_include() -> Path:
    """The ORT include folder, refused when its API is newer than the installed onnxruntime."""
    include = ort_include_dir()
    header_version, runtime_version = header_api_version(include), runtime_api_version()
    if header_version > runtime_version:
        raise NativeBuildError(
            f"the ORT headers in {include} are API version {header_version}, newer than the installed "
            f"onnxruntime (API {runtime_version}): use headers of ONNX Runtime 1.{runtime_version} or older"
        )
    return include


def library_target(extra_flags: list[str] | None = None, include: Path | None = None) -> Path:
    """Where the library built from these sources, flags, compiler and CPU lives in the cache."""
    flags = CXXFLAGS + list(extra_flags or [])
    return cache_dir() / "native" / _build_key(include or _checked_include(), sources(), flags) / LIBRARY_NAME


def build(force: bool = False, extra_flags: list[str] | None = None, verbose: bool = False) -> Path:
    """Compile the library into the cache (unless already there) and return its path.

    ``extra_flags`` (e.g. ``["-fopt-info-vec-optimized"]``) go to the compiler; with ``verbose``
    the compiler's diagnostics are printed to stderr. A cached library is used only when the
    cache is private to this user (:func:`check_private`)."""
    include, srcs, root = _checked_include(), sources(), cache_dir()
    flags = CXXFLAGS + list(extra_flags or [])
    target = library_target(extra_flags, include)
    check_private(target, root)
    if target.is_file() and not force:
        return target
    _private_dirs(target.parent, root)
    check_private(target.parent, root)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    cmd = [*compiler(), *flags, "-I", str(include), "-I", str(custom_ops_dir() / "native"), *map(str, srcs), "-o", tmp]
    result = _run(cmd)
    if verbose and result.stderr:
        sys.stderr.write(result.stderr)
    if result.returncode != 0:
        os.unlink(tmp)
        raise NativeBuildError(
            "building the attn2onnx ORT kernel library failed:\n  " + shlex.join(cmd) + "\n" + result.stderr[-6000:]
        )
    os.replace(tmp, target)  # atomic: concurrent builders never load a half-written file
    return target


def build_sanitized(force: bool = False) -> Path:
    """The library built with :data:`SANITIZER_FLAGS` (cached apart from the regular build)."""
    return build(force=force, extra_flags=SANITIZER_FLAGS)


def sanitizer_preload() -> list[str]:
    """The compiler's sanitizer runtimes (:data:`SANITIZER_RUNTIMES`, resolved to their files) that a
    process must preload (``LD_PRELOAD``, in this order) before it loads the sanitizer build;
    NativeBuildError when the compiler has none (it prints the bare name of a library it lacks)."""
    found = []
    for name in SANITIZER_RUNTIMES:
        given = _run([*compiler(), f"-print-file-name={name}"]).stdout.strip()
        if not given or not os.path.isabs(given) or not os.path.exists(given):
            raise NativeBuildError(f"the compiler ({' '.join(compiler())}) has no sanitizer runtime {name}")
        found.append(os.path.realpath(given))
    return found


@functools.lru_cache(maxsize=1)
def library_path() -> Path:
    """Path of the kernel library: ATTN2ONNX_NATIVE_LIB, else the cached build (built if missing)."""
    given = os.environ.get("ATTN2ONNX_NATIVE_LIB")
    if given:
        if not Path(given).is_file():
            raise NativeBuildError(f"ATTN2ONNX_NATIVE_LIB={given} does not exist")
        return Path(given)
    return build()


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """None when the library can be used, else why not (headers missing, no compiler, ...)."""
    try:
        library_path()
    except NativeBuildError as exc:
        return str(exc)
    return None


def available() -> bool:
    """True when the kernel library is built (or can be built now) for this machine."""
    return unavailable_reason() is None


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m attn2onnx.runtime.native", description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument(
        "--vec-report",
        action="store_true",
        help="rebuild with -fopt-info-vec-optimized and print what the compiler vectorised",
    )
    parser.add_argument("--sanitize", action="store_true", help="build the sanitizer build (ASan + UBSan) instead")
    parser.add_argument(
        "--sanitizer-preload",
        action="store_true",
        help="print the LD_PRELOAD value the sanitizer build needs, and build nothing",
    )
    args = parser.parse_args(argv)
    try:
        if args.sanitizer_preload:
            print(" ".join(sanitizer_preload()))
            return 0
        if args.sanitize:
            path = build_sanitized(force=args.force)
        else:
            extra = ["-fopt-info-vec-optimized"] if args.vec_report else None
            path = build(force=args.force or args.vec_report, extra_flags=extra, verbose=args.vec_report)
    except NativeBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
