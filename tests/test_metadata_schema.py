"""attn2onnx.runtime.metadata: the one reader of attn2onnx's metadata keys, checked against the
graph (issue 19, item 6). Small graphs built with onnx.helper; the commands' end-to-end error
contract on crafted files is tests/fuzz/test_fuzz_metadata.py."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from attn2onnx import cli
from attn2onnx.io_spec import InputSpec, specs_to_json
from attn2onnx.runtime.metadata import (
    MAX_DEPTH,
    MetadataError,
    read_decode,
    read_input_specs,
    read_max_seq,
    require_decode,
)

VOCAB = 8
LIMIT = None  # the cache keeps every position (past dim "past")


def decode_graph(meta: dict | str | None = None, reshape_to: list[int] | None = None) -> onnx.ModelProto:
    """A runnable stand-in for a decode graph with one cache [batch, past, 2]: logits [B,T,8]
    are the ids broadcast, present = Concat(past, ids broadcast). ``reshape_to`` reshapes the
    logits to a fixed shape (an ORT run-time failure at other sizes). ``meta``: the
    ``attn2onnx.decode`` value (default: the true description)."""
    ints = [
        helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", d])
        for n, d in (("input_ids", "seq"), ("attention_mask", "past+seq"), ("position_ids", "seq"))
    ]
    past = helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, ["batch", "past", 2])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", VOCAB])
    present = helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, ["batch", "past+seq", 2])
    nodes = [
        helper.make_node("Cast", ["input_ids"], ["ids_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["ids_f", "axis2"], ["u"]),
        helper.make_node("Expand", ["u", "vocab_shape"], ["wide" if reshape_to else "logits"]),
        helper.make_node("Expand", ["u", "cache_shape"], ["new"]),
        helper.make_node("Concat", ["past_key_values.0.key", "new"], ["present.0.key"], axis=1),
    ]
    inits = [
        helper.make_tensor("axis2", TensorProto.INT64, [1], [2]),
        helper.make_tensor("vocab_shape", TensorProto.INT64, [3], [1, 1, VOCAB]),
        helper.make_tensor("cache_shape", TensorProto.INT64, [3], [1, 1, 2]),
    ]
    if reshape_to:
        nodes.append(helper.make_node("Reshape", ["wide", "fixed"], ["logits"]))
        inits.append(helper.make_tensor("fixed", TensorProto.INT64, [len(reshape_to)], reshape_to))
    graph = helper.make_graph(nodes, "decode", [*ints, past], [logits, present], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if meta is None:
        meta = true_meta()
    helper.set_model_props(model, {"attn2onnx.decode": meta if isinstance(meta, str) else json.dumps(meta)})
    return model


def true_meta() -> dict:
    return {
        "variant": "mha",
        "vocab_size": VOCAB,
        "max_len": 16,
        "inputs": ["input_ids", "attention_mask", "position_ids"],
        "caches": [
            {
                "layer": 0,
                "input": "past_key_values.0.key",
                "output": "present.0.key",
                "dims": ["batch", "past", 2],
                "holds": "K",
                "limit": LIMIT,
            }
        ],
    }


def with_props(model: onnx.ModelProto, props: dict[str, str]) -> onnx.ModelProto:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    del model.metadata_props[:]
    helper.set_model_props(model, props)
    return model


def plain_graph(dims: list, elem: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """x -> Identity -> y, x of ``dims``."""
    x = helper.make_tensor_value_info("x", elem, dims)
    y = helper.make_tensor_value_info("y", elem, dims)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "plain", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def one_line(error: pytest.ExceptionInfo, key: str) -> str:
    text = str(error.value)
    assert "\n" not in text and key in text, text
    return text


# --- attn2onnx.decode -------------------------------------------------------------------------
def test_true_description_reads_as_typed_objects():
    meta = read_decode(decode_graph())
    assert (meta.vocab_size, meta.max_len, meta.inputs) == (VOCAB, 16, ("input_ids", "attention_mask", "position_ids"))
    (cache,) = meta.caches
    assert cache.dims == ("batch", "past", 2) and cache.limit is None and cache.shape(3, 5) == (3, 5, 2)
    assert read_decode(plain_graph(["batch", 4])) is None


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        (lambda m: [], "must be an object"),
        (lambda m: {k: v for k, v in m.items() if k != "max_len"}, "lacks field 'max_len'"),
        (lambda m: {**m, "max_len": float("inf")}, "max_len must be an integer"),
        (lambda m: {**m, "max_len": 2**40}, "max_len must be an integer"),
        (lambda m: {**m, "vocab_size": 9}, "vocab_size is 9, but the graph's logits have 8"),
        (lambda m: {**m, "inputs": ["input_ids", "attention_mask", "past_key_values.0.key"]}, "int64 input of rank 2"),
        (lambda m: {**m, "caches": []}, "do not describe graph input 'past_key_values.0.key'"),
        (lambda m: {**m, "caches": m["caches"] * 2}, "named twice"),
        (lambda m: {**m, "caches": [{**m["caches"][0], "limit": 3}]}, "its past dim is 'past'"),
        (lambda m: {**m, "caches": [{**m["caches"][0], "dims": ["batch", "past", 4]}]}, "has 2 there"),
        (lambda m: {**m, "caches": [{**m["caches"][0], "input": "past.9"}]}, "'past.9' is not an input"),
        (lambda m: {**m, "caches": [{**m["caches"][0], "extra": 1}]}, "unknown field 'extra'"),
    ],
)
def test_lying_or_malformed_description_is_one_line(edit, says):
    with pytest.raises(MetadataError) as error:
        read_decode(decode_graph(edit(true_meta())))
    assert says in one_line(error, "attn2onnx.decode")


def test_nesting_is_bounded_before_json_recurses():
    deep = "[" * 200_000 + "]" * 200_000
    with pytest.raises(MetadataError) as error:
        read_decode(decode_graph(deep))
    assert f"deeper than {MAX_DEPTH}" in one_line(error, "attn2onnx.decode")
    brackets_in_strings = json.dumps({**true_meta(), "variant": "[[[[[[[[[[[[[[[["})
    assert read_decode(decode_graph(brackets_in_strings)).variant == "[" * 16


def test_max_len_above_max_seq_is_refused():
    model = decode_graph()
    model = with_props(model, {"attn2onnx.decode": json.dumps(true_meta()), "attn2onnx.max_seq": "8"})
    with pytest.raises(MetadataError, match="more than the model's attn2onnx.max_seq 8"):
        read_decode(model)


def test_require_decode_names_the_file():
    with pytest.raises(Exception, match="m.onnx is not a decode graph"):
        require_decode(plain_graph(["batch", 4]), "m.onnx")


# --- attn2onnx.inputs / attn2onnx.max_seq -----------------------------------------------------
def test_input_specs_read_back_and_checked():
    model = plain_graph(["batch", "seq", 4])
    specs = [InputSpec("x", ("batch", "seq", 4), "float")]
    assert read_input_specs(with_props(model, {"attn2onnx.inputs": specs_to_json(specs)})) == specs
    for bad, says in (
        ([InputSpec("x", ("batch", "seq", 5), "float")], "has 4 there"),
        ([InputSpec("x", ("batch", 7, 4), "float")], "is 7, but graph tensor 'x' has \"seq\" there"),
        ([InputSpec("x", ("batch", "batch", 4), "float")], "pairs them otherwise"),
        ([InputSpec("x", ("batch", "seq", 4), "mask")], "says 'x' is mask (bool), but the graph input is float32"),
        ([InputSpec("x", ("batch", "seq", 4), "float", precision="fp16")], "is float (float16)"),
        ([InputSpec("z", ("batch", "seq", 4), "float")], "'z' is not an input of the graph"),
        ([], "does not describe graph input 'x'"),
    ):
        with pytest.raises(MetadataError) as error:
            read_input_specs(with_props(model, {"attn2onnx.inputs": specs_to_json(bad)}))
        assert says in one_line(error, "attn2onnx.inputs")


@pytest.mark.parametrize("text", ["", "abc", "-1", "0", "1e309", "\u00b2", "9" * 5000, "99999999999"])
def test_bad_max_seq_is_one_line(text):
    with pytest.raises(MetadataError) as error:
        read_max_seq(with_props(plain_graph(["batch", 4]), {"attn2onnx.max_seq": text}))
    one_line(error, "attn2onnx.max_seq")


def test_max_seq_reads_as_int():
    assert read_max_seq(with_props(plain_graph(["batch", 4]), {"attn2onnx.max_seq": "64"})) == 64
    assert read_max_seq(plain_graph(["batch", 4])) is None


# --- the commands on a checked description ----------------------------------------------------
def test_generate_and_run_use_the_checked_description(tmp_path, capsys):
    path = tmp_path / "d.onnx"
    onnx.save(decode_graph(), str(path))
    assert cli.main(["generate", str(path), "--prompt-ids", "1,2,3", "--max-new-tokens", "2"]) == 0
    assert cli.main(["run", str(path), "--seq-len", "2", "--past", "3", "-o", str(tmp_path / "o.npz")]) == 0
    assert np.load(tmp_path / "o.npz")["present.0.key"].shape == (1, 5, 2)


def test_ort_failure_while_generating_is_one_line(tmp_path, capfd):
    """A graph ORT loads but cannot run at the prompt's size: exit 2, one line (was a traceback)."""
    path = tmp_path / "d.onnx"
    onnx.save(decode_graph(reshape_to=[1, 3, VOCAB]), str(path))
    assert cli.main(["generate", str(path), "--prompt-ids", "1,2,3,4", "--max-new-tokens", "2"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ONNX Runtime failed to run it" in err[0], err
