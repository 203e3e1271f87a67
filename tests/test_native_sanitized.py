"""The kernel cases of tests/fuzz/native_cases.py (DcmhaAttention) and standard_cases.py
(StandardAttention) under AddressSanitizer and UndefinedBehaviorSanitizer.

The library is built a second time with ``native.SANITIZER_FLAGS`` (cached apart from the regular
build) and the cases run in a plain ONNX Runtime session in a child Python that preloads the
compiler's sanitizer runtimes: 0 sanitizer reports, 0 signals, every case as expected. Leak
detection is off (the interpreter and ORT keep allocations until exit by design); every UB report
is fatal (``-fno-sanitize-recover=all``, ``halt_on_error=1``). Without a compiler that has the
sanitizer runtimes the test skips, saying why.
"""

from __future__ import annotations

import importlib
import os

import pytest
from conftest import skip_or_fail
from fuzz import native_cases

from attn2onnx.runtime import native

CASE_MODULES = ["fuzz.native_cases", "fuzz.standard_cases"]  # DcmhaAttention's, StandardAttention's


@pytest.mark.parametrize("module", CASE_MODULES)
def test_kernel_cases_under_sanitizers(module):
    reason = native.unavailable_reason()
    if reason is not None:
        skip_or_fail(f"native kernel library unavailable: {reason}")
    try:
        preload = native.sanitizer_preload()
        library = native.build_sanitized()
    except native.NativeBuildError as exc:
        pytest.skip(f"no sanitizer build on this machine: {exc}")
    assert library != native.library_path()  # cached apart from the regular build
    env = dict(
        os.environ,
        LD_PRELOAD=" ".join(preload),
        ASAN_OPTIONS="detect_leaks=0",
        UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1",
    )
    env.pop("ATTN2ONNX_NATIVE_LIB", None)
    results = native_cases.run_cases(library, env, module=module)
    broken = native_cases.failures(results, importlib.import_module(module).cases())
    assert not broken, "\n".join(f"{case}: {'; '.join(found)}" for case, found in broken.items())
