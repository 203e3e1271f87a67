"""CacheUpdate's backends besides its standard-op function body (``OpDef.backends``).

Plain constants and no imports, on purpose: the native build (``python -m attn2onnx.runtime.native``)
reads this file by path to find the C++ kernel without importing the op set, which needs torch.
"""

KERNEL_SOURCE = "kernel.cc"  # ONNX Runtime CPU kernel: writes the new rows in place when the output is the buffer
