"""One bound on intra-op threads (issue 19, item 7): every command's ``--threads`` and the
API's ``session(threads=)`` take 1 .. thread_limit() (the CPUs this process may use, at
least MIN_THREAD_LIMIT); more is a one-line error before any model is read, never thousands of
spinning threads or an int32 overflow traceback."""

from __future__ import annotations

import pytest
from onnx import TensorProto, helper

from attn2onnx.errors import UsageError
from attn2onnx.runtime import sessions
from attn2onnx.runtime.sessions import MIN_THREAD_LIMIT, session, thread_limit
from test_cli_basic import assert_one_line_error, call


@pytest.fixture
def four_cpus(monkeypatch):
    """This process seen as one that may run on 4 CPUs: the limit is MIN_THREAD_LIMIT."""
    monkeypatch.setattr(sessions, "usable_cpus", lambda: 4)


def identity_model() -> bytes:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_the_limit_is_the_usable_cpus_or_the_floor(monkeypatch):
    monkeypatch.setattr(sessions, "usable_cpus", lambda: 4)
    assert thread_limit() == MIN_THREAD_LIMIT
    monkeypatch.setattr(sessions, "usable_cpus", lambda: 96)
    assert thread_limit() == 96


@pytest.mark.parametrize("command", ["run", "generate"])
@pytest.mark.parametrize("threads", [MIN_THREAD_LIMIT + 1, 3000, 2**32])
def test_every_command_refuses_threads_past_the_limit(capsys, tmp_path, four_cpus, command, threads):
    model = str(tmp_path / "missing.onnx")  # refused before the model is looked at
    extra = ["--prompt-ids", "1"] if command == "generate" else []
    status, out, err = call(capsys, command, model, *extra, "--threads", str(threads))
    assert status == 2, (out, err)
    assert_one_line_error(err, f"argument --threads: must be 1 .. {MIN_THREAD_LIMIT}, got {threads}")


@pytest.mark.parametrize("threads", [0, MIN_THREAD_LIMIT + 1, 3000, 2**32, 2.0, True])
def test_session_refuses_threads_outside_the_limit(four_cpus, threads):
    with pytest.raises(UsageError, match="threads must be"):
        session(identity_model(), threads=threads)


def test_session_takes_threads_up_to_the_limit(four_cpus):
    assert session(identity_model(), threads=MIN_THREAD_LIMIT).get_outputs()[0].name == "y"
