"""Billion-parameter checkpoints within one machine's memory (issue 24).

The in-memory paths build the whole float32 model, let torch's exporter copy every weight into
its ONNX graph and serialise it: three or more copies of the weights at once. Here the graph is
traced on a model whose parameters live on the ``meta`` device (shapes only), and every weight
is read from the checkpoint by name while the external-data file is written, one at a time:

* :mod:`.synthetic` writes a DCFormer-release folder of the published sizes with random weights
  (the test data for all of this, nothing downloaded);
* :mod:`.release` reads such a folder lazily (safetensors headers, one layer at a time);
* :mod:`.fold` moves the exporter's weight-only Transpose / Reshape nodes into lazy weights;
* :mod:`.export` is the streaming export (full-sequence and ``--decode`` graphs);
* :mod:`.limits` estimates memory and disk from the config and refuses what cannot fit.
"""
