"""Shared KV buffers for a Hugging Face transformers decode graph
(:mod:`attn2onnx.importers.transformers_decode`, after ``optimize --target ort``).

There the caches are Optimum's ``past_key_values.{i}.key / value`` [B,Hkv,past,d], each layer's
``present = Concat(past, new, axis -2)`` (the new rows after RoPE), and its attention is
:mod:`.fuse_standard_attention`'s ``MultiHeadAttention(q, K, V, -, -, bias)`` over that present
(repeated to the query heads for grouped-query attention). Each layer becomes
:mod:`.shared_kv`'s ``GroupQueryAttention`` (kv_num_heads = Hkv) over one max-length buffer per
cache, fed the new rows as [B,T,Hkv*d] and transformers' own additive mask (before its expand to
the keys' length) as attention_bias. transformers computes that mask and the positions from the
past length, read as ``Shape(past_key_values.*)[2]``; a buffer's length is not the past, so
those reads become total - seq (attention_mask's length minus input_ids').

A fully masked row (a left-pad position at prefill) gets, in the growing graph, the bias' minimum
on every key: a uniform softmax over all of them. GQA keeps it to the causal keys, so as in
:mod:`.shared_kv` such a row's output is replaced by the mean of V over the valid positions.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .shared_kv import (
    MS_DOMAIN,
    SharedKvError,
    _drop_dead_nodes,
    _empty_rows,
    _head_width,
    _lengths,
    _producers,
    _set_buffer_dim,
    _uniform_fix,
)

VIEW_OPS = ("Reshape", "Transpose", "Expand")  # between a present and the attention's K / V
EMPTY_BELOW = float(np.finfo(np.float32).min) / 2  # a row whose largest bias is below: no allowed key


def _present_of(producers: dict[str, onnx.NodeProto], name: str, outputs_of: dict[str, str]) -> onnx.NodeProto:
    """The Concat(past, new) writing a cache output that attention input ``name`` views."""
    node = producers.get(name)
    while node is not None and node.op_type in VIEW_OPS:
        node = producers.get(node.input[0])
    if node is None or node.op_type != "Concat" or node.output[0] not in outputs_of or len(node.input) != 2:
        raise SharedKvError(f"attention input {name!r} is not a cache extended by the new tokens")
    axis = next(a.i for a in node.attribute if a.name == "axis")
    if axis not in (2, -2) or outputs_of[node.output[0]] != node.input[0]:
        raise SharedKvError(f"cache output {node.output[0]!r} does not extend its input along the past axis")
    return node


def _tokens(name: str, new: str) -> tuple[list[onnx.NodeProto], str]:
    """[B,Hkv,T,d] new rows as GQA takes them, [B,T,Hkv*d]."""
    flat = f"{name}_tokens"
    return [
        helper.make_node("Transpose", [new], [f"{name}_bthd"], perm=[0, 2, 1, 3], name=f"{name}_bthd"),
        helper.make_node("Reshape", [f"{name}_bthd", "shared_kv_flat"], [flat], name=f"{name}_flat"),
    ], flat


def _unexpanded(
    producers: dict[str, onnx.NodeProto], name: str, bias: str
) -> tuple[str, list[onnx.NodeProto], str | None]:
    """An attention bias without its expand to the keys' length (a buffer's length now):
    (bias, nodes computing it, the guarded mask's [B,1,T,1] empty-row value or None). Either
    Expand(mask) or fuse_standard_attention's Where(Expand(Or(allowed, empty)), 0, NEG)."""
    node = producers.get(bias)
    if node is not None and node.op_type == "Expand":
        return node.input[0], [], None
    try:
        empty = _empty_rows(producers, bias)
    except SharedKvError:
        return bias, [], None
    expanded = producers[node.input[0]]
    if expanded.op_type != "Expand":
        return bias, [], empty
    where = helper.make_node("Where", [expanded.input[0], *node.input[1:]], [f"{name}_bias"], name=f"{name}_bias")
    return f"{name}_bias", [where], empty


def _past_reads(graph: onnx.GraphProto, caches: set[str], past: str) -> dict[int, list[onnx.NodeProto]]:
    """Every Shape read of a cache: its past dim becomes ``past``; batch / heads stay (a buffer
    has them); any other read refuses."""
    replaced: dict[int, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in set(node.input) & caches:
            attrs = {a.name: a.i for a in node.attribute}
            if node.op_type == "Concat":
                continue  # the layer's present, checked with its attention
            if node.op_type != "Shape":
                raise SharedKvError(f"cache {name!r} is read by {node.op_type} node {node.name!r}")
            span = (attrs.get("start", 0), attrs.get("end"))
            if span == (2, 3):
                replaced[id(node)] = [helper.make_node("Identity", [past], list(node.output), name=node.name)]
            elif span[1] is None or span[1] > 2 or span[0] < 0:
                raise SharedKvError(f"cache {name!r}: Shape node {node.name!r} reads more than its batch and heads")
    return replaced


def share_hf_kv_buffers(
    model: onnx.ModelProto, caches: list[tuple[str, str]], ids: str, mask: str, dim_name: str
) -> int:
    """Rewrite the transformers decode graph ``model`` in place: every layer's MultiHeadAttention
    over Concat-grown caches onto GQA over shared buffers (``caches``: (input, output) names).
    Returns the number of layers rewritten; a SharedKvError names what cannot be."""
    graph = model.graph
    producers = _producers(graph)
    outputs_of = {o: i for i, o in caches}
    inputs = {i.name: i for i in graph.input}
    length_nodes, seqlens, total32, queries, total64 = _lengths(graph, mask, ids)
    past = "shared_kv_past"
    length_nodes.append(helper.make_node("Sub", [total64, "shared_kv_seq"], [past], name=past))
    graph.initializer.append(numpy_helper.from_array(np.array([0, 0, -1], np.int64), "shared_kv_flat"))
    replaced = _past_reads(graph, set(outputs_of.values()), past)
    layers = [n for n in graph.node if n.op_type == "MultiHeadAttention" and n.domain == MS_DOMAIN]
    if not layers:
        raise SharedKvError("the graph has no fused attention layer")
    for node in layers:
        q, k, v, key_pad, _, bias, *rest = (list(node.input) + [""] * 8)[:8]
        if key_pad or not bias or any(rest):
            raise SharedKvError(f"attention node {node.name!r} is not a cache-free MultiHeadAttention with a bias")
        cat_k, cat_v = _present_of(producers, k, outputs_of), _present_of(producers, v, outputs_of)
        bias, bias_nodes, rows = _unexpanded(producers, node.name, bias)
        key_nodes, new_k = _tokens(f"{node.name}_k", cat_k.input[1])
        value_nodes, new_v = _tokens(f"{node.name}_v", cat_v.input[1])
        cache = inputs[cat_k.input[0]]
        kv_heads = cache.type.tensor_type.shape.dim[1].dim_value
        heads = next(a.i for a in node.attribute if a.name == "num_heads")
        if not kv_heads or heads % kv_heads:
            raise SharedKvError(f"attention node {node.name!r} has {heads} heads, not a multiple of {cache.name!r}'s")
        attrs = {"num_heads": heads, "kv_num_heads": kv_heads}
        attrs.update({a.name: a.f for a in node.attribute if a.name == "scale"})
        raw, empty = f"{node.name}_gqa_out", f"{node.name}_empty"
        gqa = helper.make_node(
            "GroupQueryAttention",
            [q, new_k, new_v, cat_k.input[0], cat_v.input[0], seqlens, total32, "", "", "", bias]
            + ["", "", "", "", "", queries],
            [raw, cat_k.output[0], cat_v.output[0]],
            name=f"{node.name}_gqa",
            domain=MS_DOMAIN,
            **attrs,
        )
        if rows is None:  # transformers' additive mask: a row whose every key has the minimum
            row_max = f"{node.name}_row_max"
            rows = [
                helper.make_node("ReduceMax", [bias, "shared_kv_heads_keys"], [row_max], keepdims=1, name=row_max),
                helper.make_node("Less", [row_max, "shared_kv_empty_below"], [empty], name=empty),
            ]
        else:  # the guarded mask of fuse_standard_attention (sdpa's boolean mask): its empty rows
            rows, empty = [], rows
        width, elem_type = _head_width(cache) * heads, cache.type.tensor_type.elem_type
        fix, init = _uniform_fix(
            node.name, empty, cat_v.output[0], total64, raw, node.output[0], width, elem_type, heads // kv_heads
        )
        graph.initializer.extend(init)
        replaced[id(cat_k)] = replaced[id(cat_v)] = []  # GQA writes the presents now
        replaced[id(node)] = [*key_nodes, *value_nodes, *bias_nodes, gqa, *rows, *fix]
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([1, 3], np.int64), "shared_kv_heads_keys"),
            numpy_helper.from_array(np.array(EMPTY_BELOW, np.float32), "shared_kv_empty_below"),
        ]
    )
    nodes = [new for node in graph.node for new in replaced.get(id(node), [node])]
    del graph.node[:]
    graph.node.extend(length_nodes + nodes)  # the lengths first: every node that reads them comes later
    _drop_dead_nodes(graph)
    outputs = {o.name: o for o in graph.output}
    for name, output in caches:
        readers = [n for n in graph.node if name in n.input and n.op_type != "Shape"]
        if len(readers) != 1 or readers[0].op_type != "GroupQueryAttention":
            raise SharedKvError(f"cache {name!r} is not read by one fused attention layer")
        if any(output in n.input for n in graph.node):
            raise SharedKvError(f"cache output {output!r} is read inside the graph")
        _set_buffer_dim(inputs[name], dim_name)
        _set_buffer_dim(outputs[output], dim_name)
    return len(layers)


__all__ = ["share_hf_kv_buffers"]
