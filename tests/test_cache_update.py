"""ai.attn2onnx::CacheUpdate (custom_ops/cache_update): the op that writes a decode step's new
cache rows into a shared max-length buffer (``export --decode --shared-kv`` for dcmha).

The native kernel, the standard-op function body and the PyTorch reference agree; bound to one
buffer as input and output (IO binding, as DecodeSession binds past and present), the kernel
writes into that buffer and touches nothing but the new rows (shown by the memory a forked
child maps, not by timing); bad shapes and positions are one clear error each, never a crash.
"""

from __future__ import annotations

import multiprocessing
import resource

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from attn2onnx.custom_ops import DOMAIN, function_protos
from attn2onnx.runtime import native

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.unavailable_reason()}")

TYPES = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}


def model(dtype=np.float32, with_body: bool = False) -> bytes:
    """One CacheUpdate node: (buffer, new_rows, position) -> out; with its function body attached."""
    node = helper.make_node("CacheUpdate", ["buffer", "new_rows", "position"], ["out"], domain=DOMAIN)
    elem = TYPES[dtype]
    graph = helper.make_graph(
        [node],
        "cache_update",
        [
            helper.make_tensor_value_info("buffer", elem, None),
            helper.make_tensor_value_info("new_rows", elem, None),
            helper.make_tensor_value_info("position", TensorProto.INT64, None),
        ],
        [helper.make_tensor_value_info("out", elem, None)],
    )
    functions = [function_protos()["CacheUpdate"]] if with_body else []
    opsets = [helper.make_opsetid("", 23), helper.make_opsetid(DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets, functions=functions, ir_version=10).SerializeToString()


def session(dtype=np.float32, native_kernel: bool = True):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if native_kernel:
        options.register_custom_ops_library(str(native.library_path()))
    return ort.InferenceSession(model(dtype, with_body=not native_kernel), options, providers=["CPUExecutionProvider"])


CASES = [  # buffer shape, new rows, position
    ((2, 10, 3, 4), 1, 0),
    ((2, 10, 3, 4), 3, 7),
    ((1, 6, 2, 5, 3), 2, 4),  # dcmha's key factors [B,S,2,2R+1,N]
    ((3, 5, 7), 5, 0),
    ((2, 8, 4), 0, 8),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("shape,rows,position", CASES)
def test_kernel_body_and_reference_agree(shape, rows, position, dtype):
    from attn2onnx.custom_ops.cache_update import cache_update_reference

    rng = np.random.default_rng(0)
    buffer = rng.standard_normal(shape).astype(dtype)
    new = rng.standard_normal((shape[0], rows, *shape[2:])).astype(dtype)
    feeds = {"buffer": buffer, "new_rows": new, "position": np.array(position, np.int64)}
    want = cache_update_reference(torch.from_numpy(buffer), torch.from_numpy(new), torch.tensor(position)).numpy()
    assert np.array_equal(want[:, position : position + rows], new)
    for native_kernel in (True, False):
        got = session(dtype, native_kernel).run(None, feeds)[0]
        np.testing.assert_array_equal(got, want, err_msg=f"native={native_kernel}")
    assert np.array_equal(feeds["buffer"], buffer)  # a plain run leaves the input alone


def test_bound_buffer_is_written_in_place():
    """Past and present bound to one OrtValue: the output is that memory, the new rows are in
    the caller's array, every other position keeps its value."""
    import onnxruntime as ort

    rng = np.random.default_rng(1)
    array = rng.standard_normal((2, 16, 3, 8)).astype(np.float32)
    before = array.copy()
    new = rng.standard_normal((2, 1, 3, 8)).astype(np.float32)
    value = ort.OrtValue.ortvalue_from_numpy(array)
    sess = session()
    binding = sess.io_binding()
    binding.bind_ortvalue_input("buffer", value)
    binding.bind_cpu_input("new_rows", new)
    binding.bind_cpu_input("position", np.array([5], np.int64))
    binding.bind_ortvalue_output("out", value)
    sess.run_with_iobinding(binding)
    assert binding.get_outputs()[0].data_ptr() == array.ctypes.data
    assert np.array_equal(array[:, 5:6], new)
    before[:, 5:6] = new
    assert np.array_equal(array, before)


BIG = (1, 1 << 16, 8, 64)  # 128 MiB of fp32: a copy of it would map every page


def _touched_mib(in_place: bool, queue) -> None:
    """In a forked child: write one row into a fresh zero buffer of BIG (pages not yet mapped),
    bound as the output (in place) or with a second fresh buffer as the output; put how many MiB
    the process mapped meanwhile (peak resident size)."""
    import onnxruntime as ort

    sess = session()
    buffer = np.zeros(BIG, np.float32)  # calloc'd: mapped on first write
    value = ort.OrtValue.ortvalue_from_numpy(buffer)
    out = value if in_place else ort.OrtValue.ortvalue_from_numpy(np.zeros(BIG, np.float32))
    new = np.ones((BIG[0], 1, *BIG[2:]), np.float32)
    binding = sess.io_binding()
    binding.bind_ortvalue_input("buffer", value)
    binding.bind_cpu_input("new_rows", new)
    binding.bind_cpu_input("position", np.array([BIG[1] // 2], np.int64))
    binding.bind_ortvalue_output("out", out)
    warm = {"buffer": np.zeros((1, 2, 1), np.float32), "new_rows": np.zeros((1, 1, 1), np.float32)}
    sess.run(None, {**warm, "position": np.array(0, np.int64)})  # the session's own allocations happen here
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sess.run_with_iobinding(binding)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start
    ok = bool(np.array_equal(out.numpy()[:, BIG[1] // 2], new[:, 0]))
    queue.put((grown / 1024, ok))


def touched_mib(in_place: bool) -> tuple[float, bool]:
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_touched_mib, args=(in_place, queue))
    child.start()
    result = queue.get(timeout=120)
    child.join(timeout=60)
    assert child.exitcode == 0
    return result


def test_in_place_write_copies_nothing_else():
    """Evidence without timing: writing one row in place maps a few pages of a 128 MiB buffer,
    while the same call with another buffer as its output copies (maps) all of it."""
    in_place, written = touched_mib(True)
    copied, copy_written = touched_mib(False)
    assert written and copy_written
    assert copied > 100, f"the control copy mapped only {copied:.1f} MiB: the measure cannot see a copy"
    assert in_place < 8, f"the in-place write mapped {in_place:.1f} MiB of a 128 MiB buffer"


BAD = [  # buffer shape, new_rows shape, position, what the error says
    ((2, 10, 3, 4), (2, 2, 3, 4), 9, "2 rows at position 9 do not fit a buffer of 10 positions"),
    ((2, 10, 3, 4), (2, 1, 3, 4), -1, "1 rows at position -1 do not fit"),
    ((2, 10, 3, 4), (2, 11, 3, 4), 0, "11 rows at position 0 do not fit"),
    ((2, 10, 3, 4), (2, 1, 3, 5), 0, "must match buffer [2,10,3,4] on every axis but 1"),
    ((2, 10, 3, 4), (1, 1, 3, 4), 0, "must match buffer"),
    ((2, 10, 3, 4), (2, 1, 12), 0, "of the same rank"),
    ((10,), (1,), 0, "of the same rank"),
    ((2, 10, 3, 4), (2, 1, 3, 4), [1, 2], "position must be an int64 scalar or [1], got [2]"),
    ((2, 10, 3, 4), (2, 1, 3, 4), [[1]], "position must be an int64 scalar or [1], got [1,1]"),
    ((2, 10, 3, 4), (2, 1, 3, 4), np.int64(2**62), "do not fit"),
]


def _bad_cases(queue) -> None:
    """In a forked child (a crash stays there): each BAD case's error message, or None when it ran."""
    sess = session()
    messages = []
    for buffer, rows, position, _ in BAD:
        feeds = {
            "buffer": np.zeros(buffer, np.float32),
            "new_rows": np.zeros(rows, np.float32),
            "position": np.array(position, np.int64),
        }
        try:
            sess.run(None, feeds)
            messages.append(None)
        except Exception as e:  # noqa: BLE001  (ORT raises its own exception types)
            messages.append(str(e))
    queue.put(messages)


def test_bad_shapes_and_positions_are_one_clear_error():
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_bad_cases, args=(queue,))
    child.start()
    messages = queue.get(timeout=120)
    child.join(timeout=60)
    assert child.exitcode == 0, "the kernel crashed the process"
    for (*_, expected), message in zip(BAD, messages):
        assert message is not None and "CacheUpdate: " in message and expected in message, (expected, message)


def test_function_body_is_a_valid_onnx_function():
    proto = onnx.ModelProto.FromString(model(with_body=True))
    shapes = {"buffer": ["B", "S", 4], "new_rows": ["B", "T", 4], "position": [], "out": ["B", "S", 4]}
    for value in [*proto.graph.input, *proto.graph.output]:
        value.CopyFrom(helper.make_tensor_value_info(value.name, value.type.tensor_type.elem_type, shapes[value.name]))
    onnx.checker.check_model(proto, full_check=True)
