"""Every ai.attn2onnx node is checked against its op's schema and rules before optimize or run.

Issue 11 item 6: ``attn2onnx optimize`` accepted malformed nodes (window=-1, rank-2 q, a missing
``factors`` silently filled in, factors [0,0,0,0]) and ``attn2onnx run`` crashed in ORT with a
traceback, or ran factors=[-1,...] / eps=-1 to non-finite outputs. For every op and attribute a
value at the limit passes and one past it fails, through optimize_model, session() and the CLI
(exit 2, one line, no output file).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto
from onnx import helper as oh

import attn2onnx.custom_ops as ops
from attn2onnx import cli
from attn2onnx.custom_ops import InvalidModelError, check_model
from attn2onnx.errors import UsageError
from attn2onnx.passes import optimize_model
from attn2onnx.runtime import session

QKV = {"q": [2, 8, 4, 16], "k": [2, 8, 4, 16], "v": [2, 8, 4, 16], "key_padding_mask": [2, 8]}
MIXES = {
    name: [4] if "bias" in name else [4, 4]
    for name in (
        f"{stage}_{kind}_{side}" for stage in ("pre", "post") for side in ("q", "k") for kind in ("mix", "bias")
    )
}
# op -> (static input shapes, attributes): a valid node, each attribute at a legal value.
VALID = {
    "SuperMix": ({"x": [2, 8, 16], "wa": [12, 12], "key_padding_mask": [2, 8]}, {"causal": 1}),
    "DcmhaCompose": (
        {"a": [2, 4, 8, 8], "q_factors": [2, 8, 5, 4], "k_factors": [2, 8, 5, 4], "static_mix": [4, 4]},
        {"use_static_mix": 1},
    ),
    "DcmhaAttention": (
        {**QKV, "q_factors": [2, 8, 2, 5, 4], "k_factors": [2, 8, 2, 5, 4], "static_mix": [2, 4, 4]},
        {"scale": 0.0, "causal": 1, "window": 3, "use_static_mix": 1},
    ),
    "ProbAttention": (QKV, {"scale": 0.0, "causal": 1}),
    "LandmarkAttention": (
        {"q": [2, 16, 4, 8], "k": [2, 16, 4, 8], "v": [2, 16, 4, 8], "key_padding_mask": [2, 16], **MIXES},
        {"landmarks": 4, "grid": 2, "scale": 0.0},
    ),
    "PooledNormAttention": (
        QKV,
        {"factors": [1, 2, 3, 8], "normalize": 1, "eps": 1e-5, "beta": 1.0, "rescale": 1, "scale": 0.0},
    ),
}
INF, NAN = math.inf, math.nan

# (op, attribute changes, the error's text; None: valid, at the limit)
LIMITS = [
    ("SuperMix", {"causal": 0}, None),
    ("SuperMix", {"causal": 2}, "attribute 'causal' must be one of 0, 1, found 2"),
    ("SuperMix", {"causal": -1}, "attribute 'causal' must be one of 0, 1, found -1"),
    ("DcmhaCompose", {"use_static_mix": 0}, None),
    ("DcmhaCompose", {"use_static_mix": 2}, "attribute 'use_static_mix' must be one of 0, 1, found 2"),
    ("DcmhaAttention", {"window": 0, "causal": 0}, None),
    ("DcmhaAttention", {"window": 1}, None),
    ("DcmhaAttention", {"window": -1}, "attribute 'window' must be >= 0, found -1"),
    ("DcmhaAttention", {"window": 3, "causal": 0}, "needs window > 0 only with causal = 1, found window=3, causal=0"),
    ("DcmhaAttention", {"causal": 2}, "attribute 'causal' must be one of 0, 1, found 2"),
    ("DcmhaAttention", {"use_static_mix": -1}, "attribute 'use_static_mix' must be one of 0, 1, found -1"),
    ("DcmhaAttention", {"scale": -0.5}, None),
    ("DcmhaAttention", {"scale": INF}, "attribute 'scale' must be finite, found inf"),
    ("DcmhaAttention", {"scale": NAN}, "attribute 'scale' must be finite, found nan"),
    ("DcmhaAttention", {"aot": 1, "plugin_namespace": "attn2onnx"}, None),
    ("DcmhaAttention", {"aot": 2}, "attribute 'aot' must be one of 0, 1, found 2"),
    ("ProbAttention", {"causal": 0, "scale": 0.125}, None),
    ("ProbAttention", {"causal": 3}, "attribute 'causal' must be one of 0, 1, found 3"),
    ("ProbAttention", {"scale": -INF}, "attribute 'scale' must be finite, found -inf"),
    ("LandmarkAttention", {"landmarks": 1, "grid": 0}, None),
    ("LandmarkAttention", {"landmarks": 1, "grid": 1}, None),
    ("LandmarkAttention", {"landmarks": 0, "grid": 0}, "attribute 'landmarks' must be >= 1, found 0"),
    ("LandmarkAttention", {"grid": -1}, "attribute 'grid' must be >= 0, found -1"),
    (
        "LandmarkAttention",
        {"landmarks": 5, "grid": 2},
        "needs landmarks = grid * grid when grid > 0, found landmarks=5",
    ),
    ("LandmarkAttention", {"scale": NAN}, "attribute 'scale' must be finite, found nan"),
    ("PooledNormAttention", {"factors": [1, 1, 1, 1]}, None),
    (
        "PooledNormAttention",
        {"factors": [0, 0, 0, 0]},
        "attribute 'factors' must have every entry >= 1, found [0, 0, 0, 0]",
    ),
    ("PooledNormAttention", {"factors": [-1, 1, 1, 1]}, "attribute 'factors' must have every entry >= 1, found [-1,"),
    (
        "PooledNormAttention",
        {"factors": [1, 2, 2]},
        "attribute 'factors' needs one entry per N = 4, found 3: [1, 2, 2]",
    ),
    ("PooledNormAttention", {"factors": [1, 2, 2, 1, 1]}, "attribute 'factors' needs one entry per N = 4, found 5"),
    ("PooledNormAttention", {"normalize": 0, "rescale": 0}, None),
    ("PooledNormAttention", {"normalize": 2}, "attribute 'normalize' must be one of 0, 1, found 2"),
    ("PooledNormAttention", {"rescale": 2}, "attribute 'rescale' must be one of 0, 1, found 2"),
    ("PooledNormAttention", {"eps": 1e-12}, None),
    ("PooledNormAttention", {"eps": 0.0}, "attribute 'eps' must be > 0, found 0.0"),
    ("PooledNormAttention", {"eps": -1.0}, "attribute 'eps' must be > 0, found -1.0"),
    ("PooledNormAttention", {"eps": INF}, "attribute 'eps' must be finite, found inf"),
    ("PooledNormAttention", {"beta": -2.0}, None),
    ("PooledNormAttention", {"beta": NAN}, "attribute 'beta' must be finite, found nan"),
    ("PooledNormAttention", {"scale": INF}, "attribute 'scale' must be finite, found inf"),
    # wrong attribute types and names
    ("DcmhaAttention", {"causal": 1.0}, "attribute 'causal' must be int, found float"),
    ("PooledNormAttention", {"factors": 2}, "attribute 'factors' must be ints, found int"),
    ("ProbAttention", {"casual": 1}, "unknown attribute 'casual'; ProbAttention takes aot, causal, plugin_namespace"),
]

# (op, input shape changes, input type changes, the error's text)
INPUTS = [
    ("ProbAttention", {"q": [8, 64]}, {}, "input q must have rank 4 [B,T,N,d], found rank 2 [8, 64]"),
    ("PooledNormAttention", {"k": [2, 8, 16]}, {}, "input k must have rank 4 [B,S,N,d], found rank 3"),
    ("DcmhaAttention", {"k": [2, 8, 2, 16]}, {}, "input k axis 2 must be N = 4 (from q axis 2), found 2"),
    ("DcmhaAttention", {"static_mix": [3, 4, 4]}, {}, "input static_mix axis 0 must be 2, found 3"),
    ("DcmhaAttention", {"q_factors": [2, 8, 3, 5, 4]}, {}, "input q_factors axis 2 must be 2, found 3"),
    ("DcmhaAttention", {"key_padding_mask": [2, 9]}, {}, "input key_padding_mask axis 1 must be S = 8"),
    (
        "DcmhaCompose",
        {"q_factors": [2, 8, 4, 4], "k_factors": [2, 8, 4, 4]},
        {},
        "needs factor rows F = 2R+1 (odd), found F=4",
    ),
    ("DcmhaCompose", {"a": [2, 4, 8, 6]}, {}, "input k_factors axis 1 must be S = 6 (from a axis 3), found 8"),
    ("ProbAttention", {"v": [2, 8, 4, 8]}, {}, "input v axis 3 must be d = 16 (from q axis 3), found 8"),
    ("SuperMix", {"wa": [4, 4]}, {}, "needs a sequence length T <= wa's size Lmax, found T=8, L=4"),
    ("SuperMix", {"wa": [12, 10]}, {}, "input wa axis 1 must be L = 12 (from wa axis 0), found 10"),
    (
        "LandmarkAttention",
        {n: [2, 15, 4, 8] for n in "qkv"} | {"key_padding_mask": [2, 15]},
        {},
        "needs a square token map (T a perfect square) when grid > 0, found grid=2, T=15",
    ),
    ("LandmarkAttention", {"post_bias_k": [3]}, {}, "input post_bias_k axis 0 must be N = 4 (from q axis 2), found 3"),
    (
        "PooledNormAttention",
        {"q": [2, 8, 2, 16], "k": [2, 8, 2, 16], "v": [2, 8, 2, 16]},
        {},
        "attribute 'factors' needs one entry per N = 2, found 4",
    ),
    (
        "ProbAttention",
        {},
        {"key_padding_mask": TensorProto.FLOAT},
        "input key_padding_mask must be tensor(bool), found tensor(float)",
    ),
    (
        "PooledNormAttention",
        {},
        {"v": TensorProto.FLOAT16},
        "input v must have the element type of q (float), found tensor(float16)",
    ),
    ("SuperMix", {}, {"x": TensorProto.DOUBLE}, "input x must be tensor(float) or tensor(float16) or tensor(bfloat16)"),
]


def make_model(
    op: str,
    shapes: dict | None = None,
    attrs: dict | None = None,
    types: dict | None = None,
    domain_version: int = ops.OPSET_VERSION,
) -> onnx.ModelProto:
    """One ``op`` node on static graph inputs (VALID's, updated by the arguments), every op body attached."""
    base_shapes, base_attrs = VALID[op]
    shapes, attrs = {**base_shapes, **(shapes or {})}, {**base_attrs, **(attrs or {})}
    inputs = [
        oh.make_tensor_value_info(
            name, (types or {}).get(name, TensorProto.BOOL if name == "key_padding_mask" else TensorProto.FLOAT), shape
        )
        for name, shape in shapes.items()
    ]
    outputs = [f.name for f in ops.REGISTRY[op].schema.outputs]
    node = oh.make_node(
        op,
        [f.name for f in ops.REGISTRY[op].schema.inputs if f.name in shapes],
        outputs,
        domain=ops.DOMAIN,
        name="node0",
        **attrs,
    )
    graph = oh.make_graph(
        [node], "one_op", inputs, [oh.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
    )
    return oh.make_model(
        graph,
        opset_imports=[oh.make_opsetid("", 23), oh.make_opsetid(ops.DOMAIN, domain_version)],
        functions=list(ops.function_protos().values()),
        ir_version=10,
    )


def without(model: onnx.ModelProto, attribute: str) -> onnx.ModelProto:
    """``model`` with ``attribute`` removed from its node."""
    node = model.graph.node[0]
    kept = [a for a in node.attribute if a.name != attribute]
    del node.attribute[:]
    node.attribute.extend(kept)
    return model


def random_feeds(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for value in model.graph.input:
        shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
        if value.type.tensor_type.elem_type == TensorProto.BOOL:
            feeds[value.name] = np.ones(shape, dtype=bool)
        else:
            feeds[value.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def assert_rejected(model: onnx.ModelProto, match: str) -> None:
    """optimize_model and session() both refuse ``model`` with ``match`` in the one error."""
    with pytest.raises(InvalidModelError) as caught:
        optimize_model(model, target="ort")
    assert match in str(caught.value), caught.value
    with pytest.raises(InvalidModelError) as caught:
        session(model)
    assert match in str(caught.value), caught.value
    assert isinstance(caught.value, UsageError) and "\n" not in str(caught.value)


def assert_accepted(model: onnx.ModelProto) -> None:
    """optimize_model passes, and the node runs in ORT to finite outputs."""
    check_model(model)
    optimize_model(model, target="ort")
    outputs = session(model).run(None, random_feeds(model))
    assert all(np.isfinite(o).all() for o in outputs)


def case_id(case: tuple) -> str:
    return f"{case[0]}-{'-'.join(f'{k}={v}' for k, v in case[1].items())}"


@pytest.mark.parametrize("op", sorted(VALID))
def test_valid_nodes_pass_and_run(op):
    assert_accepted(make_model(op))


@pytest.mark.parametrize("case", LIMITS, ids=[case_id(c) for c in LIMITS])
def test_attribute_limits(case):
    op, attrs, match = case
    model = make_model(op, attrs=attrs)
    if match is None:
        assert_accepted(model)
    else:
        assert_rejected(model, f"{op} node 'node0': {match}")


@pytest.mark.parametrize(
    "op,attribute", [(op, a.name) for op in sorted(VALID) for a in ops.REGISTRY[op].rules.attributes if a.required]
)
def test_every_required_attribute_must_be_there(op, attribute):
    """No default is filled in silently (PooledNormAttention's factors was)."""
    assert_rejected(without(make_model(op), attribute), f"attribute {attribute!r} is required, found it missing")


def test_empty_list_attribute_is_rejected():
    model = make_model("PooledNormAttention")
    node = model.graph.node[0]
    factors = next(a for a in node.attribute if a.name == "factors")
    del factors.ints[:]
    assert_rejected(model, "attribute 'factors' needs one entry per N, found none")


@pytest.mark.parametrize("case", INPUTS, ids=[case_id(c) for c in INPUTS])
def test_input_ranks_sizes_and_types(case):
    op, shapes, types, match = case
    assert_rejected(make_model(op, shapes=shapes, types=types), match)


def test_unknown_op_version_and_arity():
    model = make_model("ProbAttention")
    model.graph.node[0].op_type = "FlashAttention"
    assert_rejected(model, "FlashAttention node 'node0': unknown op ai.attn2onnx::FlashAttention; this op set has")
    assert_rejected(
        make_model("ProbAttention", domain_version=2), "needs opset ai.attn2onnx version 1, found version 2"
    )
    model = make_model("DcmhaAttention")
    del model.graph.node[0].input[-1]
    assert_rejected(
        model, "takes 7 to 8 inputs (q, k, v, q_factors, k_factors, key_padding_mask, static_mix, attn_mask), found 6"
    )
    model = make_model("ProbAttention")
    model.graph.node[0].input[1] = ""
    assert_rejected(model, "input k is required, found it left empty")
    model = make_model("ProbAttention")
    model.graph.node[0].output.append("extra")
    assert_rejected(model, "has 2 outputs, found 3")


def test_nodes_in_subgraphs_and_functions_are_checked():
    """A broken node inside an If branch, or inside a model-local function, is found too."""
    inner = make_model("ProbAttention", attrs={"causal": 5})
    branch = oh.make_graph(list(inner.graph.node), "then", [], list(inner.graph.output))
    cond = oh.make_tensor_value_info("cond", TensorProto.BOOL, [])
    wrapper = oh.make_node("If", ["cond"], ["o", "probs"], then_branch=branch, else_branch=branch)
    graph = oh.make_graph([wrapper], "outer", [cond, *inner.graph.input], list(inner.graph.output))
    model = oh.make_model(graph, opset_imports=list(inner.opset_import), functions=list(inner.functions), ir_version=10)
    assert_rejected(model, "ProbAttention node 'node0' in subgraph 'then': attribute 'causal' must be one of 0, 1")

    model = make_model("ProbAttention")
    broken = oh.make_node("PooledNormAttention", ["q", "k", "v", "m"], ["o"], domain=ops.DOMAIN, normalize=1)
    user_fn = oh.make_function(
        "user.fns", "MyAttention", ["q", "k", "v", "m"], ["o"], [broken], [oh.make_opsetid(ops.DOMAIN, 1)]
    )
    model.functions.append(user_fn)
    assert_rejected(model, "in function user.fns::MyAttention: attribute 'factors' is required")


def test_function_bodies_take_attribute_references_on_trust():
    """DcmhaAttention's body calls DcmhaCompose with use_static_mix=@use_static_mix: that is the
    calling node's value, checked there, so the attached bodies themselves are valid."""
    body = ops.REGISTRY["DcmhaAttention"].function_proto()
    assert any(a.ref_attr_name for n in body.node if n.domain == ops.DOMAIN for a in n.attribute)
    check_model(make_model("DcmhaAttention"))


def test_rules_match_the_schemas():
    """Each op declares a rule for every schema attribute and dims for every input, with dim
    labels that no attribute name shadows (cross rules see both in one namespace)."""
    for name, opdef in ops.REGISTRY.items():
        schema, rules = opdef.schema, opdef.rules
        assert rules is not None, name
        declared = {a.name for a in rules.attributes} | {"aot", "plugin_namespace"}
        assert declared == set(schema.attributes), name
        assert set(rules.inputs) == {i.name for i in schema.inputs}, name
        labels = {label.removesuffix("|1") for i in rules.inputs for form in rules.forms(i) for label in form.split()}
        assert not labels & set(schema.attributes), name
        assert {n for rule in rules.rules for n in rule.uses} <= labels | set(schema.attributes), name
        assert all(schema.attributes[a].required == (a in rules.required) for a in schema.attributes), name


# The malformed models, and more: through the CLI, one line and exit 2, no output file.
CLI_CASES = [
    ("DcmhaAttention", {"window": -1}, {}),
    ("DcmhaAttention", {"window": 2, "causal": 0}, {}),
    ("ProbAttention", {}, {"q": [8, 64]}),
    ("PooledNormAttention", {"factors": [0, 0, 0, 0]}, {}),
    ("PooledNormAttention", {"factors": [-1, 1, 1, 1]}, {}),
    ("PooledNormAttention", {"eps": -1.0}, {}),
    ("LandmarkAttention", {"landmarks": 0, "grid": 0}, {}),
    ("SuperMix", {"causal": 2}, {}),
    ("DcmhaCompose", {}, {"static_mix": [4, 3]}),
]


@pytest.mark.parametrize("op,attrs,shapes", CLI_CASES, ids=[case_id((c[0], {**c[1], **c[2]})) for c in CLI_CASES])
def test_cli_optimize_and_run_refuse_in_one_line(tmp_path, capsys, op, attrs, shapes):
    path = tmp_path / "bad.onnx"
    onnx.save(make_model(op, shapes=shapes, attrs=attrs), path)
    for args, output in (
        (["optimize", str(path), "-o", str(tmp_path / "out.onnx")], tmp_path / "out.onnx"),
        (["run", str(path), "-o", str(tmp_path / "out.npz")], tmp_path / "out.npz"),
        (["run", str(path), "--backend", "trt", "-o", str(tmp_path / "out.npz")], tmp_path / "out.npz"),
        (["build-engine", str(path), "-o", str(tmp_path / "out.engine")], tmp_path / "out.engine"),
    ):
        status = cli.main(args)
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert status == 2 and len(lines) == 1, err
        assert lines[0].startswith(f"attn2onnx: error: invalid model: {op} node 'node0': "), err
        assert not output.exists()


def test_missing_factors_via_the_cli(tmp_path, capsys):
    """The issue's "silently filled with a default" case: lower_attention used to pool nothing."""
    path = tmp_path / "bad.onnx"
    onnx.save(without(make_model("PooledNormAttention"), "factors"), path)
    assert cli.main(["optimize", str(path), "-o", str(tmp_path / "out.onnx")]) == 2
    assert "attribute 'factors' is required, found it missing" in capsys.readouterr().err


def test_exported_model_passes_and_a_tampered_copy_is_refused_everywhere(tmp_path, capsys):
    """A real export (DCMHA LM with a local window) passes the checks; the same file with its
    window set to -1 is refused by optimize, run and validate alike (exit 2, one line)."""
    import attn2onnx
    from attn2onnx.models import ModelConfig, build_model
    from attn2onnx.sources import from_module

    model = build_model(
        ModelConfig(family="lm", variant="dcmha", layers=1, d_model=16, heads=2, max_len=32, options={"window": 4})
    )
    attn2onnx.save(model, tmp_path / "lm.pt")
    source = from_module(model)
    result = attn2onnx.export(
        model,
        source.example_inputs(2, 8),
        tmp_path / "lm.onnx",
        specs=source.specs,
        output_names=source.output_names,
        max_seq=source.max_seq,
    )
    check_model(result.path)
    proto = onnx.load(str(result.path))
    node = next(n for n in proto.graph.node if n.op_type == "DcmhaAttention")
    next(a for a in node.attribute if a.name == "window").i = -1
    onnx.save(proto, tmp_path / "bad.onnx")
    bad = str(tmp_path / "bad.onnx")
    for args in (
        ["optimize", bad, "-o", str(tmp_path / "out.onnx")],
        ["run", bad],
        ["validate", bad, "--reference", str(tmp_path / "lm.pt"), "--shapes", "1x4"],
    ):
        status = cli.main(args)
        err = capsys.readouterr().err.strip()
        assert status == 2 and len(err.splitlines()) == 1, err
        assert "DcmhaAttention node" in err and "attribute 'window' must be >= 0, found -1" in err, err
    assert not (tmp_path / "out.onnx").exists()
