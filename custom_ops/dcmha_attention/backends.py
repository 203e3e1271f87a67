"""DcmhaAttention's backends besides its standard-op function body (``OpDef.backends``).

Plain constants and no imports, on purpose: the native build (``python -m attn2onnx.runtime.native``)
reads this file by path to find the C++ kernel without importing the op set, which needs torch.
"""

KERNEL_SOURCE = "kernel.cc"  # ONNX Runtime CPU kernel, compiled into the native library
TRITON_MODULE = "triton_kernel"  # imported where triton is: CUDA tensors dispatch to the fused kernel
TRT_PLUGIN_MODULE = "trt_plugin"  # TensorRT plugin: the Triton kernel compiled ahead of time
