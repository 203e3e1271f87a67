"""torch.export programs as users save them (issue 20, item 2).

A program saved with keyword inputs (``torch.export.export(m, (), kwargs=...)``, the natural
form for Hugging Face models) exports with the keyword names as its ONNX inputs; a program with
several outputs gets names from its output spec (dict keys) or ``output_0``.., checked by
position and name; a program's Dim ranges (min and max of batch and seq) bound the shapes its
checks run, and a shape asked for outside them is one line, exit 2.
"""

from __future__ import annotations

import json

import onnx
import pytest
import torch

from attn2onnx.sources import load_source
from test_cli_basic import assert_one_line_error, call

VOCAB = 40


class KeywordModel(torch.nn.Module):
    """Ids and an int64 attention_mask by keyword, as a Hugging Face model takes them."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = torch.nn.Embedding(VOCAB, 8)
        self.out = torch.nn.Linear(8, 4)

    def forward(self, input_ids, attention_mask=None):
        return self.out(self.tokens(input_ids) * attention_mask.unsqueeze(-1).float())


class NamedOutputs(torch.nn.Module):
    """Two outputs in a dict, as a ModelOutput gives them."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 4)

    def forward(self, x):
        y = self.proj(x)
        return {"logits": y, "scores": y.softmax(-1).sum(1)}


class TwoOutputs(NamedOutputs):
    """Two outputs in a tuple: no names of their own."""

    def forward(self, x):
        y = self.proj(x)
        return y, y.sum(-1)


def _save(path, model, args=(), kwargs=None, dynamic_shapes=None):
    torch.export.save(torch.export.export(model.eval(), args, kwargs=kwargs, dynamic_shapes=dynamic_shapes), path)
    return path


@pytest.fixture(scope="module")
def keyword_program(tmp_path_factory):
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq", max=64)}
    kwargs = {"input_ids": torch.randint(0, VOCAB, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.int64)}
    path = tmp_path_factory.mktemp("kw") / "kw.pt2"
    return _save(path, KeywordModel(), kwargs=kwargs, dynamic_shapes={"input_ids": dims, "attention_mask": dims})


def test_keyword_program_exports_with_its_keyword_names(keyword_program, capsys, tmp_path):
    specs = {s.name: s for s in load_source(keyword_program).specs}
    assert list(specs) == ["input_ids", "attention_mask"]
    assert specs["input_ids"].high == VOCAB and specs["attention_mask"].kind == "int_mask"
    out_path = tmp_path / "kw.onnx"
    status, out, err = call(capsys, "export", str(keyword_program), "-o", str(out_path))
    assert status == 0, err
    assert "MISMATCH" not in out
    assert [i.name for i in onnx.load(str(out_path)).graph.input] == ["input_ids", "attention_mask"]
    status, out, err = call(capsys, "validate", str(out_path), "--reference", str(keyword_program))
    assert status == 0, err


def test_outputs_are_named_by_the_program_and_checked_by_name(capsys, tmp_path):
    dims = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("seq", max=64)},)
    x = torch.randn(2, 7, 8)
    tuple_program = _save(tmp_path / "tuple.pt2", TwoOutputs(), (x,), dynamic_shapes=dims)
    assert load_source(tuple_program).output_names == ["output_0", "output_1"]
    program = _save(tmp_path / "named.pt2", NamedOutputs(), (x,), dynamic_shapes=dims)
    out_path = tmp_path / "named.onnx"
    status, out, err = call(capsys, "export", str(program), "-o", str(out_path))
    assert status == 0, err
    assert [o.name for o in onnx.load(str(out_path)).graph.output] == ["logits", "scores"]
    status, out, err = call(capsys, "validate", str(out_path), "--reference", str(program), "--json")
    assert status == 0, err
    for comparison in json.loads(out)["comparisons"]:
        assert [o["name"] for o in comparison["outputs"]] == ["logits", "scores"]


@pytest.fixture(scope="module")
def ranged(tmp_path_factory):
    """A program whose batch and seq Dims both run 2..32, and its export."""
    folder = tmp_path_factory.mktemp("ranged")
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh())
    dims = ({0: torch.export.Dim("batch", min=2, max=32), 1: torch.export.Dim("seq", min=2, max=32)},)
    program = _save(folder / "r.pt2", model, (torch.randn(3, 7, 8),), dynamic_shapes=dims)
    return program, folder / "r.onnx"


def test_checks_stay_inside_the_programs_dim_ranges(ranged, capsys):
    program, out_path = ranged
    assert load_source(program).size_ranges == {"batch": (2, 32), "seq": (2, 32)}
    status, out, err = call(capsys, "export", str(program), "-o", str(out_path))
    assert status == 0, err
    checks = [line for line in out.splitlines() if line.startswith("check ")]
    assert checks and all(line.endswith("ok") for line in checks), out
    status, out, err = call(capsys, "validate", str(out_path), "--reference", str(program), "--json")
    assert status == 0, err
    shapes = [c["shape"] for c in json.loads(out)["comparisons"]]
    assert shapes and all(2 <= b <= 32 and 2 <= s <= 32 for b, s in shapes), shapes


@pytest.mark.parametrize("shape", ["1x5", "40x8", "2x1", "2x40"])
def test_shape_outside_the_dim_ranges_is_one_line(ranged, capsys, shape):
    program, out_path = ranged
    if not out_path.exists():
        assert call(capsys, "export", str(program), "-o", str(out_path), "--no-check")[0] == 0
    status, out, err = call(capsys, "validate", str(out_path), "--reference", str(program), "--shapes", shape)
    assert status == 2, (out, err)
    assert_one_line_error(err, "outside")


def test_export_refuses_a_size_outside_the_dim_ranges(ranged, capsys, tmp_path):
    program, _ = ranged
    status, out, err = call(capsys, "export", str(program), "-o", str(tmp_path / "x.onnx"), "--batch", "40")
    assert status == 2, (out, err)
    assert_one_line_error(err, "batch 40")
    assert not (tmp_path / "x.onnx").exists()


def test_export_names_several_outputs_and_refuses_names_that_do_not_count_them(tmp_path):
    import attn2onnx
    from attn2onnx.exporter import ExportError

    x = torch.randn(2, 5, 8)
    result = attn2onnx.export(TwoOutputs().eval(), (x,), tmp_path / "two.onnx")
    assert result.output_names == ["output_0", "output_1"]
    with pytest.raises(ExportError, match="gives 2 outputs but output_names names 1"):
        attn2onnx.export(TwoOutputs().eval(), (x,), tmp_path / "one.onnx", output_names=["y"])
    assert not (tmp_path / "one.onnx").exists()


class PadTrueAttention(torch.nn.Module):
    """One attention head masked as fairseq and nn.MultiheadAttention do: masked_fill(-inf) where
    the bool key_padding_mask is True (True = pad)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(8, 24)

    def forward(self, x, key_padding_mask):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        s = (q @ k.transpose(-1, -2)).masked_fill(key_padding_mask[:, None, :], float("-inf"))
        return s.softmax(-1) @ v


def test_bool_mask_of_unknown_convention_gets_rows_of_both_values(tmp_path, capsys):
    """A program's bool input may be True = pad: its random rows hold both values, so no row is
    all padding in either convention (an all-True row made PyTorch NaN and the check fail)."""
    from attn2onnx.io_spec import random_inputs

    batch, seq = torch.export.Dim("batch", max=16), torch.export.Dim("seq", min=2, max=64)
    x, mask = torch.randn(2, 8, 8), torch.zeros(2, 8, dtype=torch.bool)
    path = _save(tmp_path / "pad_true.pt2", PadTrueAttention(), (x, mask), dynamic_shapes=({0: batch, 1: seq},) * 2)
    source = load_source(path)
    assert [s.kind for s in source.specs] == ["float", "bool_mask"]
    rows = random_inputs(source.specs, 5, 9)["key_padding_mask"]
    assert rows.any(axis=1).all() and not rows.all(axis=1).any(), rows
    status, out, err = call(capsys, "export", str(path), "-o", str(tmp_path / "m.onnx"), "--optimize")
    assert status == 0, out + err
    assert "unknown convention" in out


def test_a_program_saved_without_sample_inputs_loads(tmp_path):
    """A program without example inputs has an empty sample_inputs entry: nothing to check, not
    a damaged archive (it was refused as one)."""
    program = torch.export.export(TwoOutputs().eval(), (torch.randn(2, 8),))
    program._example_inputs = None
    torch.export.save(program, tmp_path / "bare.pt2")
    assert load_source(tmp_path / "bare.pt2").output_names == ["output_0", "output_1"]
