"""Package layout: custom_ops/ and passes/ live at the top of the repo and install as
attn2onnx.custom_ops and attn2onnx.passes (pyproject.toml holds everything else)."""

from setuptools import find_packages, setup

SUBTREES = {"attn2onnx": "attn2onnx", "attn2onnx.custom_ops": "custom_ops", "attn2onnx.passes": "passes"}

packages = []
for package, folder in SUBTREES.items():
    packages += [package] + [f"{package}.{sub}" for sub in find_packages(folder)]

setup(packages=packages, package_dir=SUBTREES)
