"""Hostile-input fuzz suite of the ``attn2onnx`` command (a package, so that its conftest and
helpers do not collide with tests/conftest.py on sys.path)."""
