"""StandardAttention's backends besides its standard-op function body (``OpDef.backends``).

Plain constants and no imports: the native build reads this file by path (see
custom_ops/dcmha_attention/backends.py).
"""

KERNEL_SOURCE = "kernel.cc"  # ONNX Runtime CPU kernel (single-pass flash form), compiled into the native library
