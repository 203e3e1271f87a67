#!/usr/bin/env bash
# Install attn2onnx with its test extra (torch pinned to the CPU build) and run the test suite.
# The native ORT kernel library is fetched (ORT headers from Debian) and built on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0 -e ".[test]"
python3 -m pytest -q -p no:cacheprovider "$@"
