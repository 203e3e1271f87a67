"""Dynamic dims that fit real modules (issue 10, part 2): inferred from the example inputs by
size, or given as torch.export ``dynamic_shapes``; a dim that torch specialises is one line
(a typed DynamicShapeError in Python, exit 2 on the CLI), never torch's traceback."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import attn2onnx
from attn2onnx.io_spec import DynamicShapeError, InputSpec, specs_from_examples
from attn2onnx.sources import ModelSource
from test_cli_basic import assert_one_line_error, call

D, HEADS = 32, 4


class RopeLayer(nn.Module):
    """Attention written the way the DCFormer authors' layer is: forward(x [B,T,D],
    freqs_cis [T, d/2, 2], mask [1, 1, T, T] bool), RoPE from the precomputed freqs and the
    mask sliced to the current length."""

    def __init__(self) -> None:
        super().__init__()
        self.wqkv = nn.Linear(D, 3 * D, bias=False)
        self.wo = nn.Linear(D, D, bias=False)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (z.view(b, t, HEADS, D // HEADS) for z in self.wqkv(x).split(D, dim=-1))
        q, k = rope(q, freqs_cis), rope(k, freqs_cis)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, :, :t, :t]
        )
        return self.wo(y.transpose(1, 2).reshape(b, t, D))


def rope(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """The release's apply_rotary_emb: pairs of channels rotated by freqs_cis [T, d/2, (cos, sin)]."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    f = freqs_cis.view(1, x.size(1), 1, pairs.size(3), 2)
    out = torch.stack(
        [pairs[..., 0] * f[..., 0] - pairs[..., 1] * f[..., 1], pairs[..., 1] * f[..., 0] + pairs[..., 0] * f[..., 1]],
        dim=-1,
    )
    return out.flatten(3)


class FixedLengthMix(nn.Module):
    """Super attention's token mixing: one learned W_a [L, L], so the length is fixed at L."""

    def __init__(self, length: int = 6) -> None:
        super().__init__()
        self.W_a = nn.Parameter(torch.randn(length, length))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.W_a @ x


def rope_inputs(batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mask = torch.tril(torch.ones(1, 1, seq, seq, dtype=torch.bool))
    return torch.randn(batch, seq, D), torch.randn(seq, D // HEADS // 2, 2), mask


def graph_dims(path) -> list[list]:
    proto = onnx.load(str(path))
    return [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in proto.graph.input]


# -- naming dims by size ----------------------------------------------------------------------
def test_dims_are_named_by_size_not_position():
    """freqs' leading T is seq (not batch), the mask's leading 1s stay static, and freqs'
    trailing 2 (equal to the batch) is not the batch: only a leading dim can be."""
    specs = specs_from_examples(["x", "freqs", "mask"], rope_inputs(2, 6), dynamic=True)
    assert [s.dims for s in specs] == [("batch", "seq", D), ("seq", 4, 2), (1, 1, "seq", "seq")]
    assert [s.kind for s in specs] == ["float", "float", "mask"]


def test_ids_are_the_reference_without_a_float_sequence():
    ids, mask = torch.randint(0, 10, (3, 7)), torch.ones(3, 7, dtype=torch.bool)
    specs = specs_from_examples(["ids", "mask"], (ids, mask), dynamic=True)
    assert [s.dims for s in specs] == [("batch", "seq"), ("batch", "seq")]


def test_size_one_stays_static_and_static_export_names_nothing():
    specs = specs_from_examples(["x", "freqs", "mask"], rope_inputs(1, 6), dynamic=True)
    assert specs[0].dims == (1, "seq", D)
    specs = specs_from_examples(["x", "freqs", "mask"], rope_inputs(2, 6), dynamic=False)
    assert [s.dims for s in specs] == [(2, 6, D), (6, 4, 2), (1, 1, 6, 6)]


def test_batch_equal_to_seq_is_a_clear_error_only_when_ambiguous():
    with pytest.raises(DynamicShapeError, match="both the example batch and sequence length"):
        specs_from_examples(["x", "freqs", "mask"], rope_inputs(4, 4), dynamic=True)
    # The reference input alone is never ambiguous: dim 0 is the batch, dim 1 the sequence.
    assert specs_from_examples(["x"], (torch.randn(4, 4, D),), dynamic=True)[0].dims == ("batch", "seq", D)


# -- export ------------------------------------------------------------------------------------
def test_rope_layer_exports_dynamic_with_only_example_inputs(tmp_path):
    """The issue's done-when: (x, freqs, mask) exports with dynamic batch and sequence and the
    file computes what the module does at other sizes."""
    torch.manual_seed(0)
    model = RopeLayer().eval()
    result = attn2onnx.export(model, rope_inputs(2, 6), tmp_path / "rope.onnx")
    assert graph_dims(result.path) == [["batch", "seq", D], ["seq", 4, 2], [1, 1, "seq", "seq"]]
    session = ort.InferenceSession(str(result.path))
    for batch, seq in ((3, 9), (1, 2)):
        inputs = rope_inputs(batch, seq)
        got = session.run(None, {s.name: t.numpy() for s, t in zip(result.inputs, inputs)})[0]
        np.testing.assert_allclose(got, model(*inputs).detach().numpy(), atol=1e-5)


def test_user_dynamic_shapes_pass_through_and_shape_the_specs(tmp_path):
    """dynamic_shapes keyed by forward's parameter names: only the batch is dynamic, and the
    specs stored in the file say so."""
    model = RopeLayer().eval()
    result = attn2onnx.export(
        model,
        rope_inputs(2, 6),
        tmp_path / "rope.onnx",
        dynamic_shapes={"x": {0: "batch"}, "freqs_cis": None, "mask": None},
    )
    assert [s.dims for s in result.inputs] == [("batch", 6, D), (6, 4, 2), (1, 1, 6, 6)]
    assert graph_dims(result.path) == [["batch", 6, D], [6, 4, 2], [1, 1, 6, 6]]


def test_user_dynamic_dim_that_is_neither_batch_nor_seq_is_refused(tmp_path):
    with pytest.raises(DynamicShapeError, match="input 'input_1' dim 1 .*neither"):
        attn2onnx.export(
            RopeLayer().eval(),
            rope_inputs(2, 6),
            tmp_path / "rope.onnx",
            dynamic_shapes=({0: "batch", 1: "seq"}, {0: "seq", 1: "half"}, None),
        )
    assert not (tmp_path / "rope.onnx").exists()


def one_line(err: Exception) -> str:
    text = str(err)
    assert "\n" not in text and "\x1b" not in text, text
    return text


def test_fixed_length_module_is_one_typed_line(tmp_path):
    """W_a fixes the length: the error names the input, the dim, the size torch inferred and the
    way out; dynamic=False then exports."""
    x = torch.randn(2, 6, D)
    with pytest.raises(DynamicShapeError) as caught:
        attn2onnx.export(FixedLengthMix().eval(), (x,), tmp_path / "mix.onnx")
    text = one_line(caught.value)
    assert "input 'x' (input_0) dim 1" in text and "static size 6" in text and "dynamic=False" in text
    assert not (tmp_path / "mix.onnx").exists()
    result = attn2onnx.export(FixedLengthMix().eval(), (x,), tmp_path / "mix.onnx", dynamic=False)
    assert graph_dims(result.path) == [[2, 6, D]]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_seq": 64},  # a bounded Dim("seq"): torch reports a violated guard
        {"dynamic_shapes": ({0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")},)},  # torch specialises silently
    ],
)
def test_specialised_dim_is_one_typed_line_however_torch_says_it(tmp_path, kwargs):
    with pytest.raises(DynamicShapeError) as caught:
        attn2onnx.export(FixedLengthMix().eval(), (torch.randn(2, 6, D),), tmp_path / "mix.onnx", **kwargs)
    text = one_line(caught.value)
    assert "dim 1" in text and "static size 6" in text


def test_cli_specialised_dim_exits_2_with_one_line(capsys, tmp_path, monkeypatch):
    """The CLI's model sources declare batch and seq dynamic; a model that fixes seq fails with
    one line and exit 2, and --static exports it."""
    source = ModelSource(FixedLengthMix().eval(), [InputSpec("x", ("batch", "seq", D), "float")], ["y"])
    monkeypatch.setattr(attn2onnx.sources, "load_source", lambda *args, **kwargs: source)
    out, model = tmp_path / "mix.onnx", tmp_path / "model.pt"
    model.touch()  # export checks the path exists before it loads (the stub above) anything
    status, _, err = call(capsys, "export", str(model), "-o", str(out), "--seq-len", "6")
    assert status == 2
    assert_one_line_error(err, "input 'x' dim 1 cannot stay dynamic")
    assert not out.exists()
    status, _, err = call(capsys, "export", str(model), "-o", str(out), "--seq-len", "6", "--static")
    assert status == 0, err


def test_cli_exports_a_rope_layer_program(capsys, tmp_path):
    """A torch.export program of the layer: its dims are named by the program's symbols (freqs'
    T is seq), so the CLI exports it dynamic and with --static."""
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=64)
    program = torch.export.export(
        RopeLayer().eval(), rope_inputs(2, 6), dynamic_shapes=({0: batch, 1: seq}, {0: seq}, {2: seq, 3: seq})
    )
    torch.export.save(program, tmp_path / "rope.pt2")
    for extra, freqs_dims in (([], ["seq", 4, 2]), (["--static"], [16, 4, 2])):
        status, out, err = call(capsys, "export", str(tmp_path / "rope.pt2"), "-o", str(tmp_path / "rope.onnx"), *extra)
        assert status == 0, err
        assert "MISMATCH" not in out
        assert graph_dims(tmp_path / "rope.onnx")[1] == freqs_dims


class UntraceableRope(nn.Module):
    """RoPE table reshaped with view(-1, T, ...): torch's symbolic shapes cannot prove the -1."""

    def forward(self, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        pairs = x.reshape(*x.shape[:-1], -1, 2)
        f = freqs.view(-1, pairs.size(1), pairs.size(2), 2)
        return torch.stack([pairs[..., 0] * f[..., 0], pairs[..., 1] * f[..., 1]], -1).flatten(2)


def test_any_other_torch_export_failure_is_one_typed_line(tmp_path, monkeypatch):
    from attn2onnx.exporter import ExportError

    monkeypatch.delenv("ATTN2ONNX_DEBUG", raising=False)
    path = tmp_path / "m.onnx"
    with pytest.raises(ExportError) as info:
        attn2onnx.export(UntraceableRope(), (torch.randn(2, 12, 16), torch.randn(12, 8, 2)), path)
    assert len(str(info.value).splitlines()) == 1 and "torch could not export the model" in str(info.value)
    assert isinstance(info.value, attn2onnx.UsageError) and not path.exists()
