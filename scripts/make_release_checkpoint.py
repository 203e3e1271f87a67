#!/usr/bin/env python
"""Write a DCFormer-release-format folder of a published size with random weights (issue 24).

  python scripts/make_release_checkpoint.py out/dcformer-2.8b --size 2.8b           # 5.7 GB, bf16
  python scripts/make_release_checkpoint.py out/dcformer-6.9b --size 6.9b           # 13.8 GB
  python scripts/make_release_checkpoint.py out/dcformer-100m --size 2.8b --scale 0.2 --layers 12

config.json holds the published configuration (see attn2onnx.streaming.synthetic for the
sources); the weights are safetensors shards written one tensor at a time, so memory stays at
one tensor whatever the size. --scale multiplies the width (dim, MLP) and --layers sets the
depth: the ~100M-parameter folder CI-sized runs use.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time

from attn2onnx.streaming.synthetic import DTYPES, PRESETS, parameter_count, scaled, write_release_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="folder to write (created)")
    parser.add_argument("--size", choices=sorted(PRESETS), default="2.8b", help="published configuration")
    parser.add_argument("--scale", type=float, default=1.0, help="width multiplier (dim and MLP), e.g. 0.2")
    parser.add_argument("--layers", type=int, help="number of layers (default: the configuration's)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="weight dtype (default bf16)")
    args = parser.parse_args(argv)
    if not 0 < args.scale <= 1 or (args.layers is not None and args.layers < 1):
        parser.error("--scale must be in (0, 1] and --layers positive")
    config = scaled(PRESETS[args.size], args.scale, args.layers)
    itemsize = 2 if args.dtype != "fp32" else 4
    need = parameter_count(config) * itemsize
    free = shutil.disk_usage(args.folder if __import__("os").path.isdir(args.folder) else ".").free
    if need > free:
        parser.error(f"the folder needs {need / 1e9:.1f} GB, the disk has {free / 1e9:.1f} GB free")
    print(f"{parameter_count(config) / 1e9:.3f}B parameters, {need / 1e9:.2f} GB of {args.dtype} weights")
    start = time.perf_counter()
    for name, size in write_release_checkpoint(args.folder, config, args.dtype):
        print(f"wrote {name} ({size / 1e9:.2f} GB) at {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
