"""torch.export programs of Hugging Face models, saved as a user saves them (issue 20): keyword
inputs (input_ids, attention_mask), named Dims with ranges, the model's own ModelOutput as the
output. Loading registers transformers' ModelOutput pytree nodes (only that installed library is
imported for a program); the output is named ``logits``; export with --optimize for ort, run and
validate all exit 0 with parity, at batch sizes past 1 (Llama's fused rotary too), and every
attention core fuses."""

from __future__ import annotations

import onnx
import pytest
import torch

from hf_configs import MODELS, VOCAB
from test_cli_basic import call

transformers = pytest.importorskip("transformers")

PROGRAMS = ["llama", "gpt2", "bert"]


def save_program(name: str, path) -> str:
    config_class, kwargs, model_class, _ = MODELS[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**kwargs)
    config.use_cache = False
    model = getattr(transformers, model_class)(config).eval()
    batch, seq = torch.export.Dim("batch", max=16), torch.export.Dim("seq", min=2, max=64)
    ids, mask = torch.randint(0, VOCAB, (2, 8)), torch.ones(2, 8, dtype=torch.int64)
    program = torch.export.export(
        model,
        (),
        kwargs={"input_ids": ids, "attention_mask": mask},
        dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
    )
    torch.export.save(program, path)
    return str(path)


@pytest.mark.parametrize("name", PROGRAMS)
def test_transformers_program_exports_optimises_runs_and_validates(name, tmp_path, capsys):
    program, graph = save_program(name, tmp_path / f"{name}.pt2"), str(tmp_path / "m.onnx")
    status, out, err = call(capsys, "export", program, "-o", graph, "--optimize", "--target", "ort")
    assert status == 0, out + err
    model = onnx.load(graph, load_external_data=False)
    assert [o.name for o in model.graph.output] == ["logits"]
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"]
    fused = [n for n in model.graph.node if n.op_type in ("MultiHeadAttention", "GroupQueryAttention")]
    assert len(fused) == 2 and not any(n.op_type == "Softmax" for n in model.graph.node)
    status, out, err = call(capsys, "run", graph, "--batch", "3", "--seq-len", "7")
    assert status == 0, err
    status, out, err = call(capsys, "validate", graph, "--reference", program, "--shapes", "1x5,3x9,4x16")
    assert status == 0, out + err
