"""Importers: released checkpoints of other code bases mapped exactly onto attn2onnx models.

``dcformer``: the DCFormer PyTorch release (Caiyun-AI/DCFormer, ``pytorch/dcformer``).
"""
