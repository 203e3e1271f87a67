#!/usr/bin/env bash
# Install attn2onnx (torch pinned to the CPU build), fetch the ONNX Runtime headers and build
# the native kernel library, then run the main job: every variant exported, optimised, run in
# ONNX Runtime and validated against PyTorch.
set -euo pipefail
cd "$(dirname "$0")/.."
# pip shows its downloads (minutes of them on a fresh machine) on a terminal; a log gets -q
if [ -t 1 ]; then pip_quiet=""; else pip_quiet=-q; fi
python3 -m pip install $pip_quiet torch==2.13.0 -e ".[samples]"
bash scripts/fetch_ort_headers.sh >/dev/null
python3 -m attn2onnx.runtime.native >/dev/null
attn2onnx demo "$@"
