"""C++ sources shared by the ONNX Runtime kernel library (built by attn2onnx.runtime.native)."""
