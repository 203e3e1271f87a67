"""One module per ``attn2onnx`` subcommand (see attn2onnx.cli for the interface)."""
