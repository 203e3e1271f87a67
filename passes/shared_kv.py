"""Shared KV buffers: a decode graph's standard attention onto
``com.microsoft.GroupQueryAttention`` writing into one max-length buffer per cache.

Input: a decode graph after ``optimize --target ort``, whose attention layers are
:mod:`.fuse_decode_attention`'s ``MultiHeadAttention(q, k, v, -, -, bias, past_key,
past_value) -> (out, present_key, present_value)`` with the caches as graph inputs / outputs
[B,N,past,d]. Each becomes::

    GroupQueryAttention(q, k, v, past_key, past_value, seqlens_k, total_sequence_length,
                        attention_bias=bias) -> (out', present_key, present_value)

with past and present [B,N,max_cache,d] one buffer the caller binds as both (ORT writes the
new rows in place when the two share memory, as ONNX Runtime GenAI's
``past_present_share_buffer``). The valid length is attention_mask's: total_sequence_length =
its length, seqlens_k = total - 1 for every row (left padding stays a masked prefix of each
row, through the same additive bias the MHA form takes).

A layer with one cache as keys and values (efficient: ``MultiHeadAttention(q, kv, kv, -, -,
bias)`` with kv = Reshape(Concat(Transpose(past), new)), :mod:`.lower_attention`'s form) gets
that buffer as both past_key and past_value, and a second output, the cache output's name plus
ALIAS_SUFFIX, that the caller binds to the same buffer: one buffer, the row written twice.

The mask contract's fully masked rows (variants.md section 0: a left-padded position before a
sequence's first real token, at prefill) are uniform over all keys. The bias already allows such
a row every key with its query zeroed (:func:`.lower_attention.guard_empty_rows`), but GQA's
causality keeps it to the causal keys; so where a row is empty its output is replaced by the
mean of V over all valid positions (what a uniform softmax gives), computed inside an ``If``
that runs only when some row is empty (never at a decode step of real tokens).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MS_DOMAIN = "com.microsoft"
ALIAS_SUFFIX = ".value"  # a one-cache layer's second GQA output: the same buffer, bound twice


class SharedKvError(ValueError):
    """The graph has a cache or an attention layer that the shared form cannot take."""


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output}


def _empty_rows(producers: dict[str, onnx.NodeProto], bias: str) -> str:
    """The [B|1,1,T|1,1] bool "row has no allowed key" value behind an MHA bias
    Where(Or(allowed, empty), 0, NEG) (the form emit_decode_attention writes; lower_attention's
    has an Expand after the Or)."""
    where = producers.get(bias)
    union = producers.get(where.input[0]) if where is not None and where.op_type == "Where" else None
    if union is not None and union.op_type == "Expand":  # lower_attention's form: the mask expanded
        union = producers.get(union.input[0])
    if union is None or union.op_type != "Or" or producers.get(union.input[1], onnx.NodeProto()).op_type != "Not":
        raise SharedKvError(f"attention bias {bias!r} is not the guarded mask the decode lowering writes")
    return union.input[1]


def _uniform_fix(
    name: str,
    empty: str,
    present_value: str,
    total: str,
    out: str,
    fixed: str,
    width: int,
    elem_type: int,
    groups: int = 1,
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes giving ``fixed`` = out, where an empty row takes the mean of present_value's
    first ``total`` positions instead (inside an If on "any row empty"), and their initializers.
    ``groups``: query heads per cache head (grouped-query attention: each mean repeated)."""
    p = f"{name}_uniform"
    rows = f"{p}_rows"  # [B,T,1] bool
    any_empty = f"{p}_any"
    nodes = [
        helper.make_node("Squeeze", [empty, f"{p}_axis1"], [rows], name=f"{p}_squeeze"),
        helper.make_node("Cast", [empty], [f"{p}_float"], to=TensorProto.FLOAT, name=f"{p}_cast"),
        helper.make_node("ReduceMax", [f"{p}_float"], [f"{p}_max"], keepdims=0, name=f"{p}_max"),
        helper.make_node("Cast", [f"{p}_max"], [any_empty], to=TensorProto.BOOL, name=f"{p}_cast_any"),
    ]
    then_nodes = [
        helper.make_node("Slice", [present_value, f"{p}_zero", total, f"{p}_axis2"], [f"{p}_valid"]),
        helper.make_node("ReduceMean", [f"{p}_valid", f"{p}_axis2"], [f"{p}_mean"], keepdims=1),  # [B,N,1,d]
        helper.make_node("Transpose", [f"{p}_mean"], [f"{p}_tokens"], perm=[0, 2, 1, 3]),
    ]
    then_init = [
        numpy_helper.from_array(np.array([0], np.int64), f"{p}_zero"),
        numpy_helper.from_array(np.array([2], np.int64), f"{p}_axis2"),
        numpy_helper.from_array(np.array([0, 1, width], np.int64), f"{p}_shape"),
    ]
    tokens = f"{p}_tokens"
    if groups > 1:  # [B,1,Hkv,d] -> [B,1,Hkv,G,d]: query head h reads cache head h // G
        then_nodes += [
            helper.make_node("Unsqueeze", [tokens, f"{p}_axis3"], [f"{p}_single"]),
            helper.make_node("Expand", [f"{p}_single", f"{p}_groups"], [f"{p}_grouped"]),
        ]
        then_init += [
            numpy_helper.from_array(np.array([3], np.int64), f"{p}_axis3"),
            numpy_helper.from_array(np.array([1, 1, 1, groups, 1], np.int64), f"{p}_groups"),
        ]
        tokens = f"{p}_grouped"
    then_nodes += [
        helper.make_node("Reshape", [tokens, f"{p}_shape"], [f"{p}_flat"]),  # [B,1,N*d]
        helper.make_node("Where", [rows, f"{p}_flat", out], [f"{p}_then"]),
    ]
    out_info = helper.make_tensor_value_info
    then_graph = helper.make_graph(then_nodes, f"{p}_then", [], [out_info(f"{p}_then", elem_type, None)], then_init)
    else_graph = helper.make_graph(
        [helper.make_node("Identity", [out], [f"{p}_else"])], f"{p}_else", [], [out_info(f"{p}_else", elem_type, None)]
    )
    nodes.append(
        helper.make_node("If", [any_empty], [fixed], then_branch=then_graph, else_branch=else_graph, name=f"{p}_if")
    )
    return nodes, [numpy_helper.from_array(np.array([1], np.int64), f"{p}_axis1")]


def _lengths(graph: onnx.GraphProto, mask: str, ids: str) -> tuple[list[onnx.NodeProto], str, str, str, str]:
    """Nodes computing, from attention_mask [B, past+seq] and input_ids [B, seq]: seqlens_k [B]
    int32 (total - 1 in every row), total_sequence_length (int32 scalar), query_seqlens [B]
    int32 (seq in every row: GQA then takes chunks of several tokens after a past, batched)
    and total as int64 [1] (for Slice)."""
    p = "shared_kv"
    total64, total32, seqlens, queries = f"{p}_total64", f"{p}_total32", f"{p}_seqlens_k", f"{p}_query_seqlens"
    nodes = [
        helper.make_node("Shape", [mask], [total64], start=1, end=2, name=f"{p}_total"),
        helper.make_node("Shape", [mask], [f"{p}_batch"], start=0, end=1, name=f"{p}_batch"),
        helper.make_node("Squeeze", [total64], [f"{p}_total_scalar"], name=f"{p}_squeeze"),
        helper.make_node("Cast", [f"{p}_total_scalar"], [total32], to=TensorProto.INT32, name=f"{p}_cast_total"),
        helper.make_node("Sub", [total64, f"{p}_one"], [f"{p}_last"], name=f"{p}_last"),
        helper.make_node("Expand", [f"{p}_last", f"{p}_batch"], [f"{p}_last_rows"], name=f"{p}_expand"),
        helper.make_node("Cast", [f"{p}_last_rows"], [seqlens], to=TensorProto.INT32, name=f"{p}_cast_rows"),
        helper.make_node("Shape", [ids], [f"{p}_seq"], start=1, end=2, name=f"{p}_seq"),
        helper.make_node("Expand", [f"{p}_seq", f"{p}_batch"], [f"{p}_seq_rows"], name=f"{p}_expand_seq"),
        helper.make_node("Cast", [f"{p}_seq_rows"], [queries], to=TensorProto.INT32, name=f"{p}_cast_seq"),
    ]
    graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), f"{p}_one"))
    return nodes, seqlens, total32, queries, total64


def _set_buffer_dim(value: onnx.ValueInfoProto, dim_name: str, axis: int = 2) -> None:
    """A cache's type with its past dim (``axis``: 2 of a [B,N,past,d] cache, 1 of a token-major
    [B,past,...] one) renamed ``dim_name``."""
    dims = value.type.tensor_type.shape.dim
    if len(dims) != 4 if axis == 2 else len(dims) <= axis:
        layout = "[batch, heads, past, head_dim]" if axis == 2 else "[batch, past, ...]"
        raise SharedKvError(f"cache {value.name!r} is not a {layout} tensor")
    dims[axis].Clear()
    dims[axis].dim_param = dim_name


def share_kv_buffers(model: onnx.ModelProto, caches: list[tuple[str, str]], ids: str, mask: str, dim_name: str) -> int:
    """Rewrite ``model`` in place: every MHA-with-past node onto GQA over shared buffers.
    ``caches``: the (input, output) names of every cache; each must be read by one such node
    and nothing else. Returns the number of layers rewritten; a SharedKvError names what cannot be."""
    graph = model.graph
    producers = _producers(graph)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    cache_inputs = {i for i, _ in caches}
    outputs_of = {o: i for i, o in caches}
    layers = [n for n in graph.node if n.op_type == "MultiHeadAttention" and n.domain == MS_DOMAIN]
    length_nodes, seqlens, total32, queries, total64 = _lengths(graph, mask, ids)
    new_nodes: list[onnx.NodeProto] = []
    aliases: dict[str, str] = {}
    replaced: dict[int, list[onnx.NodeProto]] = {}
    for node in layers:
        extra: list[onnx.NodeProto] = []
        heads = next(a.i for a in node.attribute if a.name == "num_heads")
        scale = next((a.f for a in node.attribute if a.name == "scale"), None)
        q, k, v, key_pad, _, bias, past_key, past_value = (list(node.input) + [""] * 8)[:8]
        empty = _empty_rows(producers, bias)
        if not past_key and k == v and not key_pad and bias:  # one cache as keys and values (efficient)
            k, past_key, present_key = _one_cache(producers, readers, k, outputs_of)
            v, past_value = k, past_key
            present_value = aliases[present_key] = f"{present_key}{ALIAS_SUFFIX}"
            replaced[id(producers[present_key])] = []  # the old present: GQA writes it now
            expanded = producers[producers[bias].input[0]]
            if expanded.op_type == "Expand":  # to the keys' length, read from the Concat: bias it unexpanded
                where = producers[bias]
                bias = f"{node.name}_bias"
                unexpanded = [expanded.input[0], *where.input[1:]]
                extra.append(helper.make_node("Where", unexpanded, [bias], name=f"{node.name}_bias"))
            out = node.output[0]
        elif key_pad or not bias or past_key not in cache_inputs or past_value not in cache_inputs:
            raise SharedKvError(f"attention node {node.name!r} is not the decode lowering's MultiHeadAttention")
        else:
            out, present_key, present_value = node.output[:3]
        raw = f"{node.name}_gqa_out"
        attrs = {"num_heads": heads, "kv_num_heads": heads}
        if scale is not None:
            attrs["scale"] = scale
        gqa = helper.make_node(
            "GroupQueryAttention",
            [q, k, v, past_key, past_value, seqlens, total32, "", "", "", bias, "", "", "", "", "", queries],
            [raw, present_key, present_value],
            name=f"{node.name}_gqa",
            domain=MS_DOMAIN,
            **attrs,
        )
        cache = next(i for i in graph.input if i.name == past_key)
        width, elem_type = _head_width(cache) * heads, cache.type.tensor_type.elem_type
        fix, init = _uniform_fix(node.name, empty, present_value, total64, raw, out, width, elem_type)
        graph.initializer.extend(init)
        replaced[id(node)] = [*extra, gqa, *fix]
    for node in graph.node:
        new_nodes.extend(replaced.get(id(node), [node]))
    # the lengths go first: every node that reads them comes later in topological order
    del graph.node[:]
    graph.node.extend(length_nodes + new_nodes)
    _drop_dead_nodes(graph)
    outputs = {o.name: o for o in graph.output}
    for present, alias in aliases.items():
        copy = graph.output.add()
        copy.CopyFrom(outputs[present])
        copy.name = alias
        outputs[alias] = copy
    for name, output in caches:
        readers_now = [n for n in graph.node if name in n.input]
        if len(readers_now) != 1 or readers_now[0].op_type != "GroupQueryAttention":
            raise SharedKvError(f"cache {name!r} is not read by one fused standard attention layer")
        _set_buffer_dim(next(i for i in graph.input if i.name == name), dim_name)
        for out in (output, aliases.get(output)):
            if out is not None:
                _set_buffer_dim(outputs[out], dim_name)
    return len(layers)


def _one_cache(
    producers: dict[str, onnx.NodeProto],
    readers: dict[str, list[onnx.NodeProto]],
    kv: str,
    outputs_of: dict[str, str],
) -> tuple[str, str, str]:
    """For MHA keys = values = Reshape(Concat([Transpose(past, 0 2 1 3), Reshape(new)], axis 1))
    whose Concat also feeds a cache output Transpose(.., 0 2 1 3): (new [B,T,D], past, present)."""
    reshape = producers.get(kv)
    cat = producers.get(reshape.input[0]) if reshape is not None and reshape.op_type == "Reshape" else None
    if cat is None or cat.op_type != "Concat" or len(cat.input) != 2:
        raise SharedKvError(f"attention keys {kv!r} are not one cache extended by the new tokens")
    back, view = producers.get(cat.input[0]), producers.get(cat.input[1])
    present = [o for n in readers.get(cat.output[0], []) if n.op_type == "Transpose" for o in n.output]
    present = [o for o in present if o in outputs_of]
    if back is None or back.op_type != "Transpose" or view is None or view.op_type != "Reshape" or len(present) != 1:
        raise SharedKvError(f"attention keys {kv!r} are not one cache extended by the new tokens")
    if outputs_of[present[0]] != back.input[0]:
        raise SharedKvError(f"cache output {present[0]!r} does not extend its input {back.input[0]!r}")
    return view.input[0], back.input[0], present[0]


def _drop_dead_nodes(graph: onnx.GraphProto) -> None:
    """Remove nodes none of whose outputs is read (by a node, a subgraph or the graph's outputs)."""
    while True:
        used = {o.name for o in graph.output}
        for node in graph.node:
            used.update(node.input)
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    used.update(name for n in a.g.node for name in n.input)
        keep = [n for n in graph.node if any(o in used for o in n.output)]
        if len(keep) == len(graph.node):
            return
        del graph.node[:]
        graph.node.extend(keep)


def _head_width(cache: onnx.ValueInfoProto) -> int:
    """head_dim of a [B,N,past,d] cache input (static)."""
    dims = cache.type.tensor_type.shape.dim
    if len(dims) != 4 or not dims[3].HasField("dim_value"):
        raise SharedKvError(f"cache {cache.name!r} has no static head_dim")
    return dims[3].dim_value


__all__ = ["ALIAS_SUFFIX", "SharedKvError", "share_kv_buffers"]
