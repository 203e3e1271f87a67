"""What the checks of a torch.export program feed it (issue 19, item 11).

Token ids are drawn over the vocabulary the program's embedding has (not only {0, 1}), an
integer ``attention_mask`` is a 0/1 padding mask (left and right padded rows, not random ids),
``position_ids`` are aranges, and the check says what it drew, one line per input.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attn2onnx.io_spec import InputSpec, random_inputs
from attn2onnx.sources import load_source
from test_cli_basic import call

VOCAB = 50


class TinyTokenModel(torch.nn.Module):
    """Token + position embeddings, masked mean over the sequence: an HF-style signature."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = torch.nn.Embedding(VOCAB, 8)
        self.positions = torch.nn.Embedding(32, 8)
        self.out = torch.nn.Linear(8, 4)

    def forward(self, input_ids, attention_mask, position_ids):
        h = self.tokens(input_ids.reshape(input_ids.shape)) + self.positions(position_ids)
        weights = attention_mask.unsqueeze(-1).float()
        return self.out((h * weights).sum(1) / weights.sum(1).clamp(min=1.0))


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    path = tmp_path_factory.mktemp("pt2") / "tokens.pt2"
    ids = torch.randint(0, VOCAB, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.int64)
    positions = torch.arange(7).expand(2, 7)
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq", max=32)}
    exported = torch.export.export(TinyTokenModel().eval(), (ids, mask, positions), dynamic_shapes=(dims,) * 3)
    torch.export.save(exported, path)
    return path


def test_program_inputs_get_their_roles(program):
    specs = {s.name: s for s in load_source(program).specs}
    assert specs["input_ids"].kind == "ids" and specs["input_ids"].high == VOCAB
    assert specs["attention_mask"].kind == "int_mask"
    assert specs["position_ids"].kind == "positions"


def test_random_inputs_draw_ids_masks_and_positions(program):
    specs = load_source(program).specs
    feeds = random_inputs(specs, 4, 9, seed=3)
    ids, mask, positions = feeds["input_ids"], feeds["attention_mask"], feeds["position_ids"]
    assert ids.dtype == mask.dtype == positions.dtype == np.int64
    assert 0 <= ids.min() and ids.max() < VOCAB and len(np.unique(ids)) > 10
    assert set(np.unique(mask)) == {0, 1}
    assert mask[0].all() and mask[1, 0] == 0 and mask[1, -1] == 0 and mask[1].any()
    assert mask.any(axis=1).all()  # an integer mask keeps a real token in every row
    assert (positions == np.arange(9)).all()


def test_bool_padding_mask_keeps_a_fully_padded_row():
    feeds = random_inputs([InputSpec("key_padding_mask", ("batch", "seq"), "mask")], 3, 6)
    mask = feeds["key_padding_mask"]
    assert mask[0].all() and not mask[1, 0] and not mask[1, -1] and mask[1].any() and not mask[2].any()


def test_describe_inputs_says_what_is_drawn(program):
    from attn2onnx.io_spec import describe_inputs

    lines = describe_inputs(load_source(program).specs)
    assert len(lines) == 3
    assert lines[0].startswith("input_ids [batch, seq] int64") and f"[0, {VOCAB})" in lines[0]
    assert lines[1].startswith("attention_mask [batch, seq] int64") and "0/1 padding mask" in lines[1]
    assert lines[2].startswith("position_ids [batch, seq] int64") and "arange" in lines[2]


def test_export_check_of_a_program_passes_and_prints_its_inputs(program, capsys, tmp_path):
    status, out, err = call(capsys, "export", str(program), "-o", str(tmp_path / "t.onnx"), "--seq-len", "9")
    assert status == 0, err
    assert "MISMATCH" not in out
    assert f"input_ids [batch, seq] int64: token ids in [0, {VOCAB})" in out
    assert "attention_mask [batch, seq] int64: 0/1 padding mask" in out
    status, out, err = call(capsys, "validate", str(tmp_path / "t.onnx"), "--reference", str(program))
    assert status == 0, err
    assert "position_ids [batch, seq] int64: positions" in out
