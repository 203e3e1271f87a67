"""What the commands print (issue 22 items 2-4): progress bars on a terminal only (never piped,
never with --json), ``run --warmup / --iterations`` timings, --json as exactly one JSON document,
aligned tables with headers a user reads, and no Python dict repr in human output."""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import attn2onnx
from attn2onnx import cli
from attn2onnx import demo as demo_module
from attn2onnx.sources import from_module
from attn2onnx.tables import format_table


class Terminal(io.StringIO):
    """A stderr that says it is a terminal (what tqdm draws on is then kept for the test)."""

    def isatty(self) -> bool:
        return True


def fake_terminal(monkeypatch) -> Terminal:
    """A terminal as sys.stderr, set inside the test (capsys puts its own stream back at each
    test phase, so a fixture's would be gone by the time the test runs)."""
    stream = Terminal()
    monkeypatch.setattr(sys, "stderr", stream)
    return stream


@pytest.fixture(scope="module")
def small_graph(tmp_path_factory) -> str:
    """x [batch, seq, 4] -> x @ W + b: runs in microseconds, needs no torch."""
    path = tmp_path_factory.mktemp("graph") / "m.onnx"
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 4])],
        [
            helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.eye(4, dtype=np.float32).ravel()),
            helper.make_tensor("b", TensorProto.FLOAT, [4], np.ones(4, np.float32)),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return str(path)


@pytest.fixture(scope="module")
def dcmha_layer(tmp_path_factory) -> str:
    """One exported DCMHA layer: ai.attn2onnx nodes that trt tags, Q|K|V MatMuls it packs."""
    config = attn2onnx.ModelConfig(family="layer", variant="dcmha", d_model=32, heads=4, max_len=32)
    model = attn2onnx.build_model(config).eval()
    source = from_module(model)
    path = tmp_path_factory.mktemp("dcmha") / "dcmha.onnx"
    attn2onnx.export(model, source.example_inputs(2, 8), path, specs=source.specs, output_names=source.output_names)
    return str(path)


def cli_in_child(argv: list[str], *, stderr_on_terminal: bool) -> tuple[str, str]:
    """stdout and stderr of ``attn2onnx ARGV`` in a child whose stderr is a pseudo-terminal
    (or a pipe); stdout is a pipe either way."""
    command = [sys.executable, "-m", "attn2onnx", *argv]
    if not stderr_on_terminal:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout, done.stderr
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 x 0
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=child) as proc:
        os.close(child)
        chunks = []
        while True:
            try:
                chunk = os.read(main, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        out = proc.stdout.read().decode()
        assert proc.wait(timeout=120) == 0, b"".join(chunks)
    os.close(main)
    return out, b"".join(chunks).decode(errors="replace")


def test_run_shows_progress_on_a_terminal_only(small_graph):
    _, on_terminal = cli_in_child(["run", small_graph, "--iterations", "3"], stderr_on_terminal=True)
    assert "running" in on_terminal and "/4 " in on_terminal, on_terminal  # 1 warm-up + 3 runs
    out, piped = cli_in_child(["run", small_graph, "--iterations", "3"], stderr_on_terminal=False)
    assert piped == "" and "ran in" in out, (out, piped)


def test_json_on_a_terminal_is_one_document_and_no_progress(small_graph):
    out, on_terminal = cli_in_child(["run", small_graph, "--json"], stderr_on_terminal=True)
    assert on_terminal == "", on_terminal
    doc = json.loads(out)  # exactly one document
    assert doc["outputs"][0]["name"] == "y" and doc["timing"]["iterations"] == 10, doc


def test_run_iterations_give_min_median_p90(small_graph, capsys):
    argv = ["run", small_graph, "--warmup", "2", "--iterations", "7", "--threads", "1"]
    assert cli.main([*argv, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    timing = doc["timing"]
    assert (timing["warmup"], timing["iterations"]) == (2, 7), timing
    assert 0 < timing["min_ms"] <= timing["median_ms"] <= timing["p90_ms"], timing
    assert (doc["provider"], doc["threads"]) == ("CPUExecutionProvider", 1), doc
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    pattern = (
        r"ran in [\d.]+ ms \(median of 7 runs after 2 warm-up; min [\d.]+ ms, p90 [\d.]+ ms\) "
        r"on ORT CPUExecutionProvider, 1 thread\n"
    )
    assert re.search(pattern, out), out


def test_optimize_bar_over_passes_on_a_terminal(small_graph, tmp_path, monkeypatch, capsys):
    terminal = fake_terminal(monkeypatch)
    assert cli.main(["optimize", small_graph, "-o", str(tmp_path / "o.onnx")]) == 0
    assert "optimize" in terminal.getvalue() and " pass/s" in terminal.getvalue(), terminal.getvalue()
    terminal.seek(0), terminal.truncate(), capsys.readouterr()
    assert cli.main(["optimize", small_graph, "-o", str(tmp_path / "o.onnx"), "--json"]) == 0
    json.loads(capsys.readouterr().out)
    assert terminal.getvalue() == ""


def test_optimize_says_what_trt_tagging_is_and_prints_no_dict(dcmha_layer, tmp_path, capsys):
    out_path = str(tmp_path / "trt.onnx")
    assert cli.main(["optimize", dcmha_layer, "-o", out_path, "--target", "trt"]) == 0
    out = capsys.readouterr().out
    assert "{" not in out and "'" not in out, out
    assert re.search(r"^  fused (\S.* x\d+)(, .* x\d+)*$", out, re.M), out
    assert "custom nodes tagged to run as a TensorRT plugin" in out, out
    assert cli.main(["optimize", dcmha_layer, "-o", out_path, "--target", "trt", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert "tagged" not in doc["fused"] and doc["other_changes"]["tagged"] >= 1, doc


def test_optimize_report_columns_aligned(dcmha_layer, tmp_path, capsys):
    assert cli.main(["optimize", dcmha_layer, "-o", str(tmp_path / "o.onnx"), "--report"]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = lines.index(next(line for line in lines if line.split()[:1] == ["pass"]))
    table = lines[start : lines.index("", start) if "" in lines[start:] else len(lines) - 1]
    column = table[0].index("what it did")
    assert len(table) > 10 and any("fuse_standard_attention" in line for line in table), table
    for line in table[1:]:
        assert line[column - 2 : column] == "  " and line[column] != " ", (column, line)


def test_format_table_aligns_text_left_numbers_right():
    text = format_table(("name", "count", "ratio"), [("a", "1,024", "1.50x"), ("longer", "7", "-")])
    assert text.splitlines() == [
        "name    count  ratio",
        "a       1,024  1.50x",
        "longer      7      -",
    ]


def demo_row(variant: str, nodes: int, after: int, custom: int, custom_after: int) -> demo_module.DemoRow:
    return demo_module.DemoRow(variant, "lm", nodes, after, custom, custom_after, 1.0, 3e-7, 0.5, 2.0, True)


def test_demo_table_names_columns_and_explains_growth():
    rows = [
        demo_row("optimised", 75, 82, 0, 0),  # grew: mask ops of the fused attention
        demo_row("sh", 64, 180, 2, 0),  # grew: custom op lowered
        demo_row("dcmha", 95, 85, 2, 2),
    ]
    lines = demo_module.format_table(rows).splitlines()
    assert "optimised" not in lines[0] and "nodes exported" in lines[0] and "ORT speed-up" in lines[0], lines[0]
    assert [line for line in lines[1:4] if "4.00x" in line] == lines[1:4], lines  # 2.0 ms / 0.5 ms
    assert lines[1].split()[3] == "82+" and lines[2].split()[3] == "180*" and lines[3].split()[3] == "85", lines
    assert any(line.startswith("* more nodes") for line in lines) and any(
        line.startswith("+ more nodes") for line in lines
    )
    end = lines[0].index("ORT speed-up") + len("ORT speed-up")
    assert all(line[end - 5 : end] == "4.00x" for line in lines[1:4]), lines  # numbers right-aligned


def test_demo_progress_on_a_terminal_only_and_json_one_document(monkeypatch, tmp_path, capsys):
    terminal = fake_terminal(monkeypatch)
    fake = lambda name, out, stage: stage("export") or demo_row(name, 9, 9, 0, 0)  # noqa: E731 - no export
    monkeypatch.setattr(demo_module, "demo_variant", fake)
    assert cli.main(["demo", "--out", str(tmp_path), "--variants", "mha,dcmha"]) == 0
    assert "/2 " in terminal.getvalue() and "dcmha: export" in terminal.getvalue(), terminal.getvalue()
    assert "mha" in capsys.readouterr().out
    terminal.seek(0), terminal.truncate()
    assert cli.main(["demo", "--out", str(tmp_path), "--variants", "mha,dcmha", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["variant"] for r in rows] == ["mha", "dcmha"] and rows[0]["speedup"] == 4.0, rows
    assert terminal.getvalue() == ""


def test_generate_counts_tokens_on_the_terminal_when_stdout_is_piped(tmp_path):
    """With stdout piped the tokens are not seen, so a bar on the terminal (stderr) counts them;
    with stderr piped too, nothing is added."""
    config = attn2onnx.ModelConfig(family="lm", variant="mha", layers=1, d_model=16, heads=2, max_len=32)
    checkpoint, graph = tmp_path / "lm.pt", str(tmp_path / "lm.decode.onnx")
    attn2onnx.save(attn2onnx.build_model(config), str(checkpoint))
    assert cli.main(["export", str(checkpoint), "-o", graph, "--decode", "--no-check"]) == 0
    argv = ["generate", graph, "--prompt-ids", "1,2", "--max-new-tokens", "5", "--eos-id", "300"]
    out, on_terminal = cli_in_child(argv, stderr_on_terminal=True)
    assert "generating" in on_terminal and "/5 " in on_terminal and "token" in on_terminal, on_terminal
    assert "generating" not in out
    _, piped = cli_in_child(argv, stderr_on_terminal=False)
    assert "generating" not in piped, piped


def test_validate_bar_over_parity_cases_on_a_terminal(tmp_path, monkeypatch, capsys):
    """validate counts its parity cases on a terminal; --json prints one document and no bar."""
    config = attn2onnx.ModelConfig(family="lm", variant="mha", layers=1, d_model=16, heads=2, max_len=32)
    checkpoint, graph = tmp_path / "lm.pt", str(tmp_path / "lm.onnx")
    attn2onnx.save(attn2onnx.build_model(config), str(checkpoint))
    assert cli.main(["export", str(checkpoint), "-o", graph, "--no-check"]) == 0
    terminal = fake_terminal(monkeypatch)
    argv = ["validate", graph, "--reference", str(checkpoint), "--shapes", "1x4,2x8,3x5"]
    assert cli.main(argv) == 0
    assert "parity cases" in terminal.getvalue() and "/3 " in terminal.getvalue(), terminal.getvalue()
    terminal.seek(0), terminal.truncate(), capsys.readouterr()
    assert cli.main([*argv, "--json"]) == 0
    json.loads(capsys.readouterr().out)
    assert terminal.getvalue() == ""
