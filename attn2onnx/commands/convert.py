"""Convert a released checkpoint folder into an attn2onnx checkpoint.

  attn2onnx convert DCFormer-2.8B/ -o dcformer-2.8b.pt

The folder is in the DCFormer PyTorch release's layout (the Caiyun-AI/DCFormer repository,
pytorch/dcformer): config.json and the weights as *.safetensors or pytorch_model*.bin, read as
weights only (no code in the folder runs). The result is the dcmha causal LM computing what the
release's forward computes (see attn2onnx.importers.dcformer for what that takes); every key,
shape and option must map, or the command stops with one line naming what does not.
`attn2onnx export DIR -o lm.onnx` converts and exports in one step."""

from __future__ import annotations

import argparse

HELP = "convert a released checkpoint folder (DCFormer PyTorch release) into an attn2onnx checkpoint"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", metavar="DIR", help="folder with config.json and *.safetensors / pytorch_model*.bin")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.pt", help="attn2onnx checkpoint to write")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..errors import UsageError
    from ..fileio import refuse_overwriting_inputs

    folder = Path(args.folder)
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder (convert takes a release folder: config.json + weights)")
    refuse_overwriting_inputs([args.output], [folder])
    from ..checkpoint import save  # torch: after the checks
    from ..importers.dcformer import import_dcformer

    model = import_dcformer(folder)
    path = save(model, args.output)
    c = model.config
    local = sum(1 for cfg in c.attention_configs() if cfg.window)
    print(
        f"wrote {path}: dcmha causal LM, {c.layers} layers ({local} local), d_model {c.d_model}, {c.heads} heads, "
        f"vocab {c.vocab_size}, {sum(p.numel() for p in model.parameters()):,} parameters"
    )
    return 0
