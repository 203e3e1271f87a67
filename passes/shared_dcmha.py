"""Shared KV buffers for DCMHA: a decode graph's ``DcmhaAttention`` layers onto one max-length
buffer per cache (K, V, key factors), written in place by ``ai.attn2onnx::CacheUpdate``.

Input: a dcmha decode graph (``optimize --target ort`` or not) whose every layer extends its
token-major caches [B,past,...] with ``Concat(past, new, axis=1)`` and attends the result with
one DcmhaAttention node (causal, with or without a local window); a window layer's present is a
Slice of that Concat (its last W - 1 positions). Each layer becomes::

    present.i.X = CacheUpdate(past_key_values.i.X, new_X, past)     # X: key, value, key_factors
    out = If(step of several tokens, or some row sees no key,
             then: DcmhaAttention(q, K[:, start:L], V[:, start:L], qf, KF[:, start:L],
                                  mask[:, start:L], ...)             # the growing graph's call
             else: DcmhaAttention(q, K, V, qf, KF, valid keys [B,max_cache], ...,
                                  causal=0, window=0))

with past and present [B,max_cache,...] one buffer the caller binds as both (the kernel then
writes the T new rows and copies nothing else). L is attention_mask's length, past = L - T, start
0 (global layer) or max(0, past - W + 1) (window W: the keys the growing cache holds).

The else branch is the decode step (one token, every row sees a key): the whole buffer is the
keys, and the key mask says which are valid: real tokens of the first L positions (of the last W
for a window layer). The kernel skips keys no row can see, so the step costs what the valid keys
cost. A masked key has probability exactly 0 and compose maps 0 to 0, so this is the growing
graph's attention up to the order of its sums. The then branch covers what that mask cannot say:
the causal order inside a chunk of several tokens (a prefill) and a row that sees no key at all
(a left-padded position: the contract's softmax is uniform over the keys the growing graph
holds, not over the buffer). It runs the growing graph's own DcmhaAttention on copies of the
valid positions, so those steps are bit-identical to it.

A window layer's buffer holds every position (not only its window): the growing cache's
position-keeping Slice is dropped and the window moves into the key mask.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .shared_kv import SharedKvError, _drop_dead_nodes, _producers, _set_buffer_dim

DOMAIN = "ai.attn2onnx"
P = "shared_dcmha"  # prefix of the names this pass adds


def _attr(node: onnx.NodeProto, name: str, default):
    """Attribute ``name`` of ``node`` as a Python value, ``default`` when the node has none."""
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _lengths(mask: str, ids: str) -> list[onnx.NodeProto]:
    """Graph-level values: {P}_total [1] (L), {P}_past [1] (L - T), {P}_valid [B,L] bool,
    {P}_positions [L] int64, {P}_batch [1], {P}_several (bool scalar: T != 1)."""
    make = helper.make_node
    return [
        make("Shape", [mask], [f"{P}_total"], start=1, end=2, name=f"{P}_total"),
        make("Shape", [mask], [f"{P}_batch"], start=0, end=1, name=f"{P}_batch"),
        make("Shape", [ids], [f"{P}_seq"], start=1, end=2, name=f"{P}_seq"),
        make("Sub", [f"{P}_total", f"{P}_seq"], [f"{P}_past"], name=f"{P}_past"),
        make("Cast", [mask], [f"{P}_valid"], to=TensorProto.BOOL, name=f"{P}_valid"),
        make("Squeeze", [f"{P}_total"], [f"{P}_total_scalar"], name=f"{P}_total_scalar"),
        make("Range", [f"{P}_zero", f"{P}_total_scalar", f"{P}_one"], [f"{P}_positions"], name=f"{P}_positions"),
        make("Equal", [f"{P}_seq", f"{P}_one_1d"], [f"{P}_single_1d"], name=f"{P}_single"),
        make("Squeeze", [f"{P}_single_1d"], [f"{P}_single"], name=f"{P}_single_scalar"),
        make("Not", [f"{P}_single"], [f"{P}_several"], name=f"{P}_several"),
    ]


CONSTANTS = {
    f"{P}_zero": np.array(0, np.int64),
    f"{P}_one": np.array(1, np.int64),
    f"{P}_zero_1d": np.array([0], np.int64),
    f"{P}_one_1d": np.array([1], np.int64),
    f"{P}_axis1": np.array([1], np.int64),
    f"{P}_false": np.array([False]),
    f"{P}_zero_float": np.array(0.0, np.float32),
}


def _window_keys(window: int) -> tuple[list[onnx.NodeProto], str, str]:
    """Nodes for the keys a single-token step of a layer with ``window`` (0: none) may see,
    {valid} [B,L] bool, and {blind} (bool scalar: some row sees none)."""
    make = helper.make_node
    w = f"{P}_w{window}"
    nodes: list[onnx.NodeProto] = []
    valid = f"{P}_valid"
    if window:  # the last W positions: s >= L - W
        nodes += [
            make("Sub", [f"{P}_total", f"{w}_size"], [f"{w}_first"], name=f"{w}_first"),
            make("GreaterOrEqual", [f"{P}_positions", f"{w}_first"], [f"{w}_keep"], name=f"{w}_keep"),
            make("And", [valid, f"{w}_keep"], [f"{w}_valid"], name=f"{w}_valid"),
        ]
        valid = f"{w}_valid"
    nodes += [
        make("Cast", [valid], [f"{w}_float"], to=TensorProto.FLOAT, name=f"{w}_float"),
        make("ReduceMax", [f"{w}_float", f"{P}_axis1"], [f"{w}_sees"], keepdims=0, name=f"{w}_sees"),  # [B]
        make("ReduceMin", [f"{w}_sees"], [f"{w}_least"], keepdims=0, name=f"{w}_least"),
        make("Equal", [f"{w}_least", f"{P}_zero_float"], [f"{w}_blind"], name=f"{w}_blind"),
    ]
    return nodes, valid, f"{w}_blind"


def _cache_of(
    producers: dict[str, onnx.NodeProto], name: str, outputs_of: dict[str, str]
) -> tuple[str, str, str, onnx.NodeProto]:
    """For a DcmhaAttention cache operand Concat([past, new], axis 1) with past a cache input:
    (past, new, present, the node that writes present: the Concat, or a window layer's Slice of it)."""
    cat = producers.get(name)
    if cat is None or cat.op_type != "Concat" or len(cat.input) != 2 or _attr(cat, "axis", None) != 1:
        raise SharedKvError(f"DcmhaAttention input {name!r} is not a cache extended by the new tokens")
    past, new = cat.input
    present = outputs_of.get(past)
    if present is None:
        raise SharedKvError(f"DcmhaAttention input {name!r} does not extend a cache input")
    if present == cat.output[0]:  # the Concat writes the present itself
        return past, new, present, cat
    cut = producers.get(present)
    if cut is None or cut.op_type != "Slice" or cut.input[0] != cat.output[0]:
        raise SharedKvError(f"cache output {present!r} does not extend its input {past!r}")
    return past, new, present, cut


def _branch(name: str, nodes: list[onnx.NodeProto], out: str, elem_type: int) -> onnx.GraphProto:
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(out, elem_type, None)])


def _layer(
    node: onnx.NodeProto, buffers: list[str], window: int, valid: str, condition: str, elem_type: int
) -> onnx.NodeProto:
    """The If that replaces DcmhaAttention ``node`` reading the cache ``buffers`` (K, V, KF)."""
    make = helper.make_node
    name = node.name or node.output[0]
    q, _, _, qf, _, _, mix = node.input[:7]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    x = f"{name}_shared"
    start = f"{P}_zero_1d"
    then_nodes = []
    if window:  # the growing window cache holds min(past, W - 1) positions before the new ones
        then_nodes += [
            make("Sub", [f"{P}_past", f"{P}_w{window}_held"], [f"{x}_back"]),
            make("Max", [f"{x}_back", f"{P}_zero_1d"], [f"{x}_start"]),
        ]
        start = f"{x}_start"
    kept = [f"{x}_k", f"{x}_v", f"{x}_kf", f"{x}_mask"]
    for source, sliced in zip([*buffers, f"{P}_valid"], kept):
        then_nodes.append(make("Slice", [source, start, f"{P}_total", f"{P}_axis1"], [sliced]))
    then_nodes.append(
        make("DcmhaAttention", [q, kept[0], kept[1], qf, kept[2], kept[3], mix], [f"{x}_then"], domain=DOMAIN, **attrs)
    )
    else_attrs = {**attrs, "causal": 0, "window": 0}
    else_nodes = [
        make("Shape", [buffers[0]], [f"{x}_capacity"], start=1, end=2),
        make("Sub", [f"{x}_capacity", f"{P}_total"], [f"{x}_unused"]),
        make("Concat", [f"{P}_batch", f"{x}_unused"], [f"{x}_pad_shape"], axis=0),
        make("Expand", [f"{P}_false", f"{x}_pad_shape"], [f"{x}_pad"]),
        make("Concat", [valid, f"{x}_pad"], [f"{x}_keys"], axis=1),  # [B, max_cache]
        make(
            "DcmhaAttention",
            [q, buffers[0], buffers[1], qf, buffers[2], f"{x}_keys", mix],
            [f"{x}_else"],
            domain=DOMAIN,
            **else_attrs,
        ),
    ]
    return make(
        "If",
        [condition],
        [node.output[0]],
        name=f"{x}_if",
        then_branch=_branch(f"{x}_then", then_nodes, f"{x}_then", elem_type),
        else_branch=_branch(f"{x}_else", else_nodes, f"{x}_else", elem_type),
    )


def share_dcmha_buffers(
    model: onnx.ModelProto, caches: list[tuple[str, str]], ids: str, mask: str, dim_name: str
) -> int:
    """Rewrite ``model`` in place: every DcmhaAttention layer onto shared buffers (module
    docstring). ``caches``: the (input, output) names of every cache; each must be extended by one
    such layer. Returns the number of layers rewritten; a SharedKvError names what cannot be."""
    from attn2onnx.custom_ops import function_protos

    graph = model.graph
    producers = _producers(graph)
    outputs_of = dict(caches)
    inputs = {i.name: i for i in graph.input}
    layers = [n for n in graph.node if n.op_type == "DcmhaAttention" and n.domain == DOMAIN]
    if not layers:
        raise SharedKvError("the graph has no DcmhaAttention layer")
    windows = sorted({int(_attr(n, "window", 0)) for n in layers})
    prelude = _lengths(mask, ids)
    init = dict(CONSTANTS)
    conditions: dict[int, tuple[str, str]] = {}
    for window in windows:
        nodes, valid, blind = _window_keys(window)
        condition = f"{P}_w{window}_exact"
        prelude += [*nodes, helper.make_node("Or", [f"{P}_several", blind], [condition], name=condition)]
        conditions[window] = (valid, condition)
        if window:
            init[f"{P}_w{window}_size"] = np.array([window], np.int64)
            init[f"{P}_w{window}_held"] = np.array([window - 1], np.int64)
    replaced: dict[int, list[onnx.NodeProto]] = {}
    dropped: set[int] = set()
    covered: set[str] = set()
    for node in layers:
        if len([i for i in node.input if i]) != 7 or not _attr(node, "causal", 0):
            raise SharedKvError(f"DcmhaAttention {node.name!r} is not a causal decode layer without attn_mask")
        updates, buffers = [], []
        for operand in (node.input[1], node.input[2], node.input[4]):
            past, new, present, writer = _cache_of(producers, operand, outputs_of)
            dropped.add(id(writer))  # CacheUpdate writes the present now
            updates.append(
                helper.make_node(
                    "CacheUpdate", [past, new, f"{P}_past"], [present], name=f"{present}_update", domain=DOMAIN
                )
            )
            buffers.append(present)
            covered.add(past)
        elem_type = inputs[updates[0].input[0]].type.tensor_type.elem_type
        valid, condition = conditions[int(_attr(node, "window", 0))]
        replaced[id(node)] = [
            *updates,
            _layer(node, buffers, int(_attr(node, "window", 0)), valid, condition, elem_type),
        ]
    missing = [name for name, _ in caches if name not in covered]
    if missing:
        raise SharedKvError(f"cache {missing[0]!r} is not extended by a DcmhaAttention layer")
    nodes = [new for n in graph.node if id(n) not in dropped for new in replaced.get(id(n), [n])]
    del graph.node[:]
    graph.node.extend(prelude + nodes)  # the prelude reads graph inputs only
    graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in init.items())
    _drop_dead_nodes(graph)
    _check_readers(graph, {name for name, _ in caches})
    outputs = {o.name: o for o in graph.output}
    for name, output in caches:
        _set_buffer_dim(inputs[name], dim_name, axis=1)
        _set_buffer_dim(outputs[output], dim_name, axis=1)
    if not any(f.name == "CacheUpdate" and f.domain == DOMAIN for f in model.functions):
        model.functions.append(function_protos()["CacheUpdate"])
    return len(layers)


def _check_readers(graph: onnx.GraphProto, cache_inputs: set[str]) -> None:
    """Each cache input must be read by its CacheUpdate only (or a Shape of its batch dim): any
    other reader would see the buffer's length as the past's, or the buffer after the write."""
    for node in graph.node:
        for name in node.input:
            if name not in cache_inputs or node.op_type == "CacheUpdate":
                continue
            if node.op_type == "Shape" and _attr(node, "start", 0) == 0 and _attr(node, "end", None) == 1:
                continue
            raise SharedKvError(f"cache {name!r} is read by {node.op_type} node {node.name!r} besides its update")


__all__ = ["share_dcmha_buffers"]
