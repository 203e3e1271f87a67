"""Hints where the tool already knows the answer (issue 22, item 5): each case's exact message
and exit code, or the behaviour that replaced a refusal -- validate reads a decode graph's
metadata and a graph's precision, commands given the other kind of model file say what to do
with it, export of a foreign torch file points to a torch.export program, an .npz with the
wrong names lists the inputs the graph takes, optimize writes .onnx files only (as export),
generate --top-k alone samples, and export --decode --optimize works.

The decode graphs are exported once per module (exports dominate the time): mha through the
API (the unoptimised reference) and through the CLI with --optimize, dcmha through the CLI with
--optimize only, its tokens checked against PyTorch's greedy decode."""

from __future__ import annotations

import json
import pickle

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import attn2onnx
from attn2onnx import progress
from attn2onnx.io_spec import METADATA_KEY, InputSpec, specs_to_json
from attn2onnx.models.decode import export_decode
from test_cli_basic import assert_one_line_error, call

PROMPT = [1, 2, 3]
TOKENS = 8
RECIPE = "torch.export.save(torch.export.export(model, (example_input,)), 'model.pt2')"


def tiny_lm(variant: str) -> torch.nn.Module:
    config = attn2onnx.ModelConfig(family="lm", variant=variant, layers=2, d_model=16, heads=2, max_len=32)
    return attn2onnx.build_model(config).eval()


def greedy(model: torch.nn.Module, prompt: list[int], tokens: int) -> list[int]:
    """Greedy tokens from PyTorch's full forward, re-run over the whole sequence every step."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(tokens):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def generated(capsys, path: str, *flags: str) -> tuple[list[int], str]:
    """``attn2onnx generate`` of PROMPT: its tokens and its stderr."""
    prompt = ",".join(map(str, PROMPT))
    status, out, err = call(capsys, "generate", path, "--prompt-ids", prompt, "--max-new-tokens", str(TOKENS), *flags)
    assert status == 0, err
    return json.loads(out)["tokens"], err


def save_graph(path, dtype: int = TensorProto.INT64) -> str:
    """A tiny graph ``y = Identity(input_ids)`` that also takes a key_padding_mask, with
    attn2onnx's input metadata (as an exported LM's inputs)."""
    ids = helper.make_tensor_value_info("input_ids", dtype, ["batch", "seq"])
    mask = helper.make_tensor_value_info("key_padding_mask", TensorProto.BOOL, ["batch", "seq"])
    y = helper.make_tensor_value_info("y", dtype, ["batch", "seq"])
    graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["y"])], "g", [ids, mask], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    specs = [InputSpec("input_ids", ("batch", "seq"), "ids", 10)]
    specs.append(InputSpec("key_padding_mask", ("batch", "seq"), "mask"))
    helper.set_model_props(model, {METADATA_KEY: specs_to_json(specs)})
    onnx.save(model, path)
    return str(path)


@pytest.fixture(scope="module")
def mha(tmp_path_factory) -> tuple[torch.nn.Module, str, str]:
    """The mha LM, its checkpoint and its (unoptimised) decode graph."""
    folder = tmp_path_factory.mktemp("hints_mha")
    model = tiny_lm("mha")
    attn2onnx.save(model, folder / "lm.pt")
    export_decode(model, folder / "lm.decode.onnx")
    return model, str(folder / "lm.pt"), str(folder / "lm.decode.onnx")


@pytest.fixture
def here(tmp_path, monkeypatch):
    """Work in ``tmp_path`` so that messages name files as a user types them."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --- validate: the graph says what it is ----------------------------------------------------
def test_validate_checks_a_decode_graph_as_one_without_decode(mha, capsys):
    """Before: 'takes inputs [input_ids, attention_mask, ...] but the reference takes ...', exit 2."""
    _, ckpt, decode = mha
    status, out, err = call(capsys, "validate", decode, "--reference", ckpt, "--shapes", "2x3", "--steps", "2")
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0] == f"{decode} is a decode graph (its metadata says so): checked as --decode, prefill + decode steps"
    assert lines[1].startswith("decode batch 2 prompt 3    +2 steps") and lines[-1].startswith("PASSED")
    status, out, err = call(capsys, "validate", decode, "--reference", ckpt, "--shapes", "2x3", "--json")
    assert status == 0, err
    assert [c["shape"] for c in json.loads(out)["comparisons"]] == [[2, 3, 4]]  # one JSON document, no note


def test_validate_takes_the_precision_of_an_fp16_graph(here, capsys):
    """Before: 'computes in fp16; --dtype fp32 does not match it' though no --dtype was given."""
    model = attn2onnx.build_model(attn2onnx.ModelConfig(family="layer", variant="mha", d_model=16, heads=2, max_len=8))
    attn2onnx.save(model, "layer.pt")
    assert call(capsys, "export", "layer.pt", "-o", "half.onnx", "--dtype", "fp16", "--no-check")[0] == 0
    status, out, err = call(capsys, "validate", "half.onnx", "--reference", "layer.pt", "--shapes", "2x5")
    assert status == 0, err
    assert out.splitlines()[-1] == "PASSED (fp16 tolerance: atol 0.01, rtol 0.01, elemwise error)"
    status, _, err = call(capsys, "validate", "half.onnx", "--reference", "layer.pt", "--dtype", "fp32")
    assert status == 2
    assert_one_line_error(err, "half.onnx computes in fp16; --dtype fp32 does not match it")  # asked for: refused


def test_validate_refuses_a_bf16_graph_by_its_precision(here, capsys):
    """A bf16 layer graph from elsewhere (no attn2onnx metadata) against the layer it computes.
    Before: no word of bf16, the check fed it fp32 inputs."""
    layer = attn2onnx.build_model(attn2onnx.ModelConfig(family="layer", variant="mha", d_model=16, heads=2))
    attn2onnx.save(layer, "layer.pt")
    x = helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["batch", "seq", 16])
    mask = helper.make_tensor_value_info("key_padding_mask", TensorProto.BOOL, ["batch", "seq"])
    y = helper.make_tensor_value_info("y", TensorProto.BFLOAT16, ["batch", "seq", 16])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x, mask], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]), "m.onnx")
    status, out, err = call(capsys, "validate", "m.onnx", "--reference", "layer.pt")
    assert (status, out, err) == (
        2,
        "",
        "attn2onnx: error: m.onnx computes in bf16; validate checks fp32 and fp16 graphs\n",
    )


def test_validate_says_the_reference_is_the_pytorch_model(here, capsys):
    """Before: 'm.onnx is not an attn2onnx checkpoint (not a PyTorch file (not a zip archive))'."""
    save_graph("m.onnx")
    status, out, err = call(capsys, "validate", "m.onnx", "--reference", "m.onnx")
    assert (status, out) == (2, "")
    assert err == (
        "attn2onnx: error: --reference m.onnx is an ONNX model; give the PyTorch model m.onnx was exported "
        "from (.pt checkpoint, .pt2 program)\n"
    )


# --- the other kind of model file -----------------------------------------------------------
EXPORT_IT = (
    "attn2onnx: error: lm.pt is a PyTorch file, not an ONNX model: export it first (attn2onnx export lm.pt -o lm.onnx"
)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["optimize", "lm.pt", "-o", "out.onnx"], EXPORT_IT + ")"),
        (["run", "lm.pt"], EXPORT_IT + ")"),
        (["validate", "lm.pt", "--reference", "lm.pt"], EXPORT_IT + ")"),
        (["generate", "lm.pt", "--prompt", "a"], EXPORT_IT + " --decode)"),
    ],
    ids=["optimize", "run", "validate", "generate"],
)
def test_a_pytorch_file_given_for_an_onnx_model_says_export_it(here, capsys, argv, message):
    """Before: 'lm.pt is not a readable ONNX model (DecodeError)'."""
    attn2onnx.save(tiny_lm("mha"), "lm.pt")
    status, out, err = call(capsys, *argv)
    assert (status, out, err) == (2, "", message + "\n")
    assert sorted(p.name for p in here.iterdir()) == ["lm.pt"]


def test_an_onnx_model_given_to_export_says_optimize_or_run_it(here, capsys):
    """Before: 'lm.onnx is not an attn2onnx checkpoint (not a PyTorch file (not a zip archive))'."""
    save_graph("lm.onnx")
    status, out, err = call(capsys, "export", "lm.onnx", "-o", "out.onnx")
    assert (status, out) == (2, "")
    assert err == (
        "attn2onnx: error: lm.onnx is already an ONNX model: optimize it (attn2onnx optimize lm.onnx -o "
        "lm.opt.onnx) or run it (attn2onnx run lm.onnx)\n"
    )


def _state_dict(path) -> None:
    torch.save(tiny_lm("mha").state_dict(), path)


def _pickled_module(path) -> None:
    torch.save(torch.nn.Linear(2, 2), path)


def _legacy_pickle(path) -> None:
    with open(path, "wb") as f:
        pickle.dump(torch.nn.Linear(2, 2), f)


@pytest.mark.parametrize(
    "make, flags, problem",
    [
        (_state_dict, [], "m.pt is not an attn2onnx checkpoint (a bare state_dict, with no model config)"),
        (
            _pickled_module,
            [],
            "m.pt is not an attn2onnx checkpoint: it holds pickled Python objects, which attn2onnx does not "
            "unpickle (that could run code)",
        ),
        (
            _legacy_pickle,
            [],
            "m.pt is not an attn2onnx checkpoint (a legacy torch file or a plain pickle, not a zip archive; "
            "attn2onnx loads it only with --trust-pickle (unpickling can run code))",
        ),
        (_state_dict, ["--trust-pickle"], "m.pt holds a OrderedDict, not a torch.nn.Module"),
        (
            _pickled_module,
            ["--trust-pickle"],
            "this module is not an attn2onnx model family; use attn2onnx.export with example inputs",
        ),
    ],
    ids=["state_dict", "pickled-module", "legacy-pickle", "trusted-state_dict", "trusted-module"],
)
def test_a_foreign_torch_file_points_to_a_torch_export_program(here, capsys, make, flags, problem):
    """Before: the problem alone, no word of how such a model exports."""
    make("m.pt")
    status, out, err = call(capsys, "export", "m.pt", "-o", "m.onnx", *flags)
    assert (status, out) == (2, "")
    assert err == (
        f"attn2onnx: error: {problem}; to export a model of your own, save it as a torch.export program: "
        f"{RECIPE}, then attn2onnx export model.pt2 -o m.onnx\n"
    )
    assert sorted(p.name for p in here.iterdir()) == ["m.pt"]


def test_a_damaged_checkpoint_gets_no_torch_export_hint(here, capsys):
    """An attn2onnx checkpoint of another format version is ours: its error stays as it was."""
    attn2onnx.save(tiny_lm("mha"), "lm.pt")
    payload = torch.load("lm.pt", weights_only=True)
    torch.save(payload | {"version": 99}, "lm.pt")
    status, _, err = call(capsys, "export", "lm.pt", "-o", "lm.onnx")
    assert status == 2
    assert err == (
        "attn2onnx: error: lm.pt: checkpoint format version 99 is not supported (this attn2onnx reads version 1)\n"
    )


# --- inputs and outputs ---------------------------------------------------------------------
def test_npz_names_that_do_not_match_list_the_inputs_the_graph_takes(here, capsys):
    """Before: 'missing input(s): key_padding_mask' alone."""
    save_graph("m.onnx")
    np.savez("in.npz", input_ids=np.zeros((1, 4), np.int64), attention_mask=np.ones((1, 4), bool))
    status, out, err = call(capsys, "run", "m.onnx", "--inputs", "in.npz", "-o", "out.npz")
    assert (status, out) == (2, "")
    assert err == (
        "attn2onnx: error: missing input(s): key_padding_mask; unexpected input(s): attention_mask; "
        "the model takes input_ids [batch, seq] int64, key_padding_mask [batch, seq] bool\n"
    )
    assert not (here / "out.npz").exists()


@pytest.mark.parametrize("command", ["optimize", "export"])
def test_an_onnx_model_goes_to_an_onnx_file_only(here, capsys, command):
    """Before: optimize -o x.txt wrote the model to x.txt (export refused it)."""
    save_graph("m.onnx")
    attn2onnx.save(tiny_lm("mha"), "lm.pt")
    source = "m.onnx" if command == "optimize" else "lm.pt"
    status, out, err = call(capsys, command, source, "-o", "x.txt")
    assert (status, out, err) == (2, "", "attn2onnx: error: output 'x.txt' should end in .onnx\n")
    assert not (here / "x.txt").exists()


# --- generate -------------------------------------------------------------------------------
def test_generate_top_k_alone_samples_at_temperature_one(mha, capsys):
    """Before: --top-k without --temperature was silently greedy."""
    _, _, decode = mha
    alone, err = generated(capsys, decode, "--top-k", "5", "--seed", "3", "--json")
    assert err.splitlines()[0] == "sampling among the top 5 at temperature 1 (--top-k without --temperature)"
    sampled, err = generated(capsys, decode, "--top-k", "5", "--temperature", "1", "--seed", "3", "--json")
    assert "sampling among" not in err
    assert alone == sampled and alone != generated(capsys, decode, "--json")[0]  # greedy differs here
    status, out, err = call(capsys, "generate", decode, "--prompt-ids", "1", "--top-k", "5", "--temperature", "0")
    assert (status, out) == (2, "")
    assert err == (
        "attn2onnx: error: --top-k 5 samples, which --temperature 0 (greedy) does not: drop one of them "
        "(--top-k alone samples at temperature 1)\n"
    )


# --- export --decode --optimize -------------------------------------------------------------
@pytest.mark.parametrize("variant", ["mha", "dcmha"])
def test_export_decode_optimize_keeps_greedy_tokens(mha, tmp_path, capsys, monkeypatch, variant):
    """Before: '--optimize is not supported with --decode yet', exit 2. The optimised decode
    graph passes export's own check, and its greedy tokens are PyTorch's (and, for mha, those
    of the unoptimised graph). On a terminal, export names each stage on stderr."""
    model = mha[0] if variant == "mha" else tiny_lm(variant)
    ckpt = mha[1] if variant == "mha" else str(attn2onnx.save(model, tmp_path / "lm.pt"))
    out = str(tmp_path / "lm.decode.opt.onnx")
    monkeypatch.setattr(progress, "shown", lambda stream=None, json_output=False: not json_output)
    status, stdout, err = call(capsys, "export", ckpt, "-o", out, "--decode", "--optimize")
    assert status == 0, err
    lines = stdout.splitlines()
    assert lines[1].startswith("optimized for ort: ") and all(line.endswith(" ok") for line in lines[2:])
    stages = [line for line in err.splitlines() if line.endswith(" ...")]
    assert stages == [
        "loading PyTorch and the exporter ...",
        f"loading {ckpt} ...",
        "exporting the decode graph to ONNX (torch.onnx, opset 23) ...",
        "optimizing for ort ...",
        "checking prefill + decode steps against PyTorch in ONNX Runtime ...",
    ]
    tokens = generated(capsys, out, "--json")[0]
    assert tokens == greedy(model, PROMPT, TOKENS)
    if variant == "mha":
        assert tokens == generated(capsys, mha[2], "--json")[0]
