"""TensorRT engines for attn2onnx models: build (strongly typed, our plugins registered) and run.

Split as Polygraphy's ``backend/trt`` is: :mod:`.loader` builds engines (loader callables and
:func:`build_engine`), :mod:`.runner` runs them (:class:`TrtSession`, and :class:`TrtRunner` for
Polygraphy's Comparator). The command is ``attn2onnx build-engine``.

TensorRT is optional and imported lazily. Where it is missing every entry point raises
:class:`TensorRTUnavailable` -- a :class:`~attn2onnx.errors.UsageError`, so the CLI prints one
line and exits 2. :func:`available` says whether it is there without raising.

Python API::

    build_engine("model.onnx", "model.engine", shapes)      # shapes: input -> (min, opt, max)
    with TrtSession("model.engine") as sess:
        outputs = sess.run({"x": x, "key_padding_mask": mask})

Build the ONNX with the ``trt`` target of ``passes`` first: it tags every ``ai.attn2onnx`` node
that has a TensorRT plugin with ``plugin_namespace`` (others import as their function body).
Engines built with the AOT plugins embed the kernels' PTX and run without Python or Triton.
"""

from . import loader, runner
from .loader import *  # noqa: F403  (the package re-exports both halves)
from .runner import *  # noqa: F403

__all__ = sorted([*loader.__all__, *runner.__all__])
