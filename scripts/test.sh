#!/usr/bin/env bash
# Install attn2onnx with its test extra (torch pinned to the CPU build), fetch the ONNX Runtime
# headers the native kernel library builds against, check lint and format (ruff), and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# pip shows its downloads (minutes of them on a fresh machine) on a terminal; a log gets -q
if [ -t 1 ]; then pip_quiet=""; else pip_quiet=-q; fi
python3 -m pip install $pip_quiet torch==2.13.0 -e ".[test]"
bash scripts/fetch_ort_headers.sh >/dev/null
python3 -m attn2onnx.runtime.native >/dev/null   # build the kernel library once, before tests run in parallel
python3 -m ruff check --quiet . && python3 -m ruff format --check --quiet .   # lint and format (pyproject [tool.ruff])
python3 -m pytest -q -p no:cacheprovider -n auto "$@"   # one worker per core (pytest-xdist)
