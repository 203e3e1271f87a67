"""Running TensorRT engines, in the manner of Polygraphy's ``backend/trt/runner.py``.

:class:`TrtSession` runs a serialized engine on CUDA through torch tensors; :class:`TrtRunner`
is the Polygraphy runner over one (what ``validate --backends trt`` compares), its engine given
as a path or as a loader (see :mod:`.loader`) that is called when the runner activates.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from typing import Any, Callable, Mapping

from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata

from ...errors import UsageError
from .loader import TensorRTUnavailable, make_logger, require_tensorrt


class TrtSession:
    """Runs a serialized engine on CUDA through torch tensors (inputs: numpy arrays or tensors)."""

    def __init__(self, engine_path: str | os.PathLike, *, verbose: bool = False):
        trt = require_tensorrt()
        import torch

        if not torch.cuda.is_available():
            raise TensorRTUnavailable("running a TensorRT engine needs a CUDA GPU; none is visible")
        self._trt, self._torch = trt, torch
        self._logger = make_logger(trt, verbose)
        self._runtime = trt.Runtime(self._logger)
        with open(os.fspath(engine_path), "rb") as f:
            self.engine = self._runtime.deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise UsageError(f"{engine_path} is not a TensorRT engine for this TensorRT version / GPU")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        self.stream = torch.cuda.Stream()

    def _torch_dtype(self, trt_dtype: Any) -> Any:
        trt, torch = self._trt, self._torch
        table = {
            trt.float32: torch.float32,
            trt.float16: torch.float16,
            trt.bfloat16: torch.bfloat16,
            trt.int32: torch.int32,
            trt.int64: torch.int64,
            trt.bool: torch.bool,
            trt.int8: torch.int8,
        }
        return table[trt_dtype]

    def run(self, feeds: Mapping[str, Any], *, as_numpy: bool = True) -> dict[str, Any]:
        """Run once; returns output name -> numpy array (bf16 as float32), or CUDA tensors."""
        torch = self._torch
        missing = set(self.input_names) - set(feeds)
        if missing:
            raise UsageError(f"missing engine inputs: {sorted(missing)}")
        keep = []
        for name in self.input_names:
            want = self._torch_dtype(self.engine.get_tensor_dtype(name))
            t = torch.as_tensor(feeds[name]).to(device="cuda", dtype=want).contiguous()
            keep.append(t)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outputs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            t = torch.empty(shape, dtype=self._torch_dtype(self.engine.get_tensor_dtype(name)), device="cuda")
            outputs[name] = t
            self.context.set_tensor_address(name, t.data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        self.stream.synchronize()
        if not as_numpy:
            return outputs
        return {n: (t.float() if t.dtype == torch.bfloat16 else t).cpu().numpy() for n, t in outputs.items()}

    def __enter__(self) -> "TrtSession":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.context = None
        self.engine = None


class TrtRunner(BaseRunner):
    """Polygraphy runner over a TensorRT engine. ``engine``: an engine file, or a loader
    returning one (called on activation, so building waits until the comparison runs);
    ``input_metadata``: the inputs as Polygraphy sees them (dynamic dims as -1)."""

    def __init__(
        self, engine: str | os.PathLike | Callable[[], str], input_metadata: TensorMetadata, name: str = "tensorrt"
    ) -> None:
        super().__init__(name=name, prefix="trt-runner")
        self.engine, self.input_metadata = engine, input_metadata

    def activate_impl(self) -> None:
        path = self.engine() if callable(self.engine) else self.engine
        self.session = TrtSession(path)

    def get_input_metadata_impl(self) -> TensorMetadata:
        return self.input_metadata

    def infer_impl(self, feed_dict: dict) -> OrderedDict:
        start = time.perf_counter()
        outputs = self.session.run(feed_dict)
        self.inference_time = time.perf_counter() - start  # Polygraphy sums runner times
        return OrderedDict(outputs)

    def deactivate_impl(self) -> None:
        del self.session


__all__ = ["TrtRunner", "TrtSession"]
