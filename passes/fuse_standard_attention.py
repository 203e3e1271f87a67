"""Standard attention as public code writes it -> one fused attention node, as rules.

Runs after :mod:`.lower_attention` (which keeps this project's own forms and their contract) on
what it left. Each rule is pattern -> check -> rewrite; every check raises
:class:`~attn2onnx.passes._match.NoMatch` naming the node, what was expected and what was found,
so :mod:`.explain` can say why a core stayed unfused.

* ``softmax_core``: ``softmax(mask(scale * q k^T)) @ v`` on heads [B,H,T,d] (or one head [B,T,d]),
  with any head layout (view + transpose, timm's packed qkv unbind, permutes), the scale on q, k
  or the logits (Mul or Div), Casts around the Softmax (fp16 autocast), and as mask: a
  ``Where`` filling <= -1e4 (either branch; ``masked_fill(bias[:, :, :T, :T] == 0, -inf)`` on a
  registered tril buffer is recognised as causal), and / or an additive float bias (HF BERT /
  GPT-2 / Llama ``finfo.min`` masks).
* ``onnx_attention``: ONNX ``Attention`` (opset 23, what torch exports for
  ``F.scaled_dot_product_attention`` and ``nn.MultiheadAttention``) on 4-D heads, for target ``ort``.

Target ``ort`` gets ``com.microsoft.MultiHeadAttention`` (a causal mask as its ``unidirectional``
mode, padding as ``key_padding_mask``, else an ``attention_bias``); ``trt`` / ``portable`` get
ONNX Attention-23. Boolean masks go through :func:`.lower_attention.emit_fused_attention`, so rows
with no allowed key keep the project's contract (uniform); where PyTorch fills with -inf such
rows are NaN in PyTorch and any value here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ._ir_utils import (
    Builder,
    attr,
    const_array,
    const_scalar,
    dims,
    expand_to_logits,
    producer,
    rank,
    replace_value,
    same_dim,
    scope_nodes,
)
from ._match import (
    NoMatch,
    allowed_parts,
    found_op,
    merged_heads_target,
    scaled,
    single_use,
    split_heads_source,
    through_cast,
)
from .lower_attention import MS_DOMAIN, emit_fused_attention, pack_projections

FILL_LIMIT = -1e4  # a Where fill at or below this is a mask (exp underflows to 0 in fp16 and fp32)


@dataclass
class Core:
    """One matched attention core, heads-first: q [B,H,T,d] (or [B,T,d]), k^T [B,H,d,S], v [B,H,S,d]."""

    rule: str
    anchor: ir.Node  # the node the fused op is inserted before
    out: ir.Value  # the core's output [B,H,T,d] (or [B,T,d]), replaced by the fused op's
    q: ir.Value
    kt: ir.Value
    v: ir.Value
    scale: float
    parts: dict | None = None  # recognised boolean mask: {"kpm": [B,S] | None, "causal": 0 | 1}
    allowed: ir.Value | None = None  # an unrecognised boolean mask [B|1,1,T|1,S]
    negated: bool = False  # ``allowed`` holds the disallowed positions (Where(c, fill, x))
    bias: ir.Value | None = None  # an additive float mask
    k: ir.Value | None = None  # keys [B,H,S,d] where the op takes them untransposed (Attention-23)


# ---------------------------------------------------------------------------------------------
# pattern + check: softmax cores
# ---------------------------------------------------------------------------------------------
def _fill(value: ir.Value) -> float | None:
    c = const_scalar(value)
    return c if c is not None and c <= FILL_LIMIT else None


def _tril_buffer(value: ir.Value) -> bool:
    """value = Slice(s) starting at 0 of a constant lower-triangular 0/1 (or bool) buffer [1,1,L,L]:
    nanoGPT's ``bias[:, :, :T, :T]``."""
    while (node := producer(value, "Slice")) is not None:
        starts = const_array(node.inputs[1])
        if starts is None or starts.any():
            return False
        value = node.inputs[0]
    arr = const_array(value)
    if arr is None or arr.ndim < 2 or arr.shape[-1] != arr.shape[-2]:
        return False
    square = arr.reshape(-1, *arr.shape[-2:])[0].astype(bool)
    return square.shape[0] == arr.size**0.5 and bool((square == np.tril(np.ones_like(square))).all())


def _bool_mask(where: ir.Node, logits_dims: tuple) -> tuple[ir.Value, dict | None, ir.Value | None, bool]:
    """where(allowed, x, fill) or where(disallowed, fill, x) -> (x, parts, unrecognised mask, negated)."""
    cond, a, b = where.inputs
    if _fill(b) is not None:
        x, allowed, negated = a, cond, False
    elif _fill(a) is not None:
        x, allowed, negated = b, cond, True
    else:
        raise NoMatch(
            where,
            f"a Where filling masked logits with a constant <= {FILL_LIMIT:g}",
            f"fill values {const_scalar(a)} / {const_scalar(b)}",
        )
    b_dim, t_dim, s_dim = logits_dims[0], logits_dims[-2], logits_dims[-1]
    if negated:
        eq, nt = producer(cond, "Equal"), producer(cond, "Not")
        if nt is not None:
            allowed, negated = nt.inputs[0], False
        elif eq is not None and const_scalar(eq.inputs[1]) == 0 and _tril_buffer(eq.inputs[0]):
            return x, {"kpm": None, "causal": 1}, None, False
    elif _tril_buffer(allowed) and same_dim(t_dim, s_dim):
        return x, {"kpm": None, "causal": 1}, None, False
    if negated:
        return x, None, cond, True
    parts = allowed_parts(allowed, b_dim, t_dim, s_dim) if len(logits_dims) == 4 else None
    return x, parts, (None if parts is not None else allowed), False


def _logits_side(add: ir.Node) -> int:
    """Which input of an Add is the logits (the other is an additive mask)."""
    out = dims(add.outputs[0])
    for i in (0, 1):
        inner = scaled(add.inputs[i])[0]
        if dims(add.inputs[i]) == out and found_op(inner) in ("MatMul", "Einsum", "Where", "Add"):
            return i
    raise NoMatch(add, "logits plus an additive mask", f"inputs {found_op(add.inputs[0])} + {found_op(add.inputs[1])}")


def _mask_chain(value: ir.Value, logits_dims: tuple) -> tuple[ir.Value, dict]:
    """Peel masks off the softmax input: Where fills and additive biases -> (logits, mask parts)."""
    found: dict = {}
    while True:
        node = producer(value, ("Where", "Add"))
        if node is None:
            return value, found
        if not single_use(value):
            raise NoMatch(node, "masked logits used once (by the Softmax)", f"{len(list(value.uses()))} uses")
        if node.op_type == "Where":
            if "where" in found:
                raise NoMatch(node, "one boolean mask", "two Where masks")
            value, found["parts"], found["allowed"], found["negated"] = _bool_mask(node, logits_dims)
            found["where"] = node
        else:
            if "bias" in found:
                raise NoMatch(node, "one additive mask", "two Adds")
            i = _logits_side(node)
            value, found["bias"] = node.inputs[i], node.inputs[1 - i]


def match_softmax_core(soft: ir.Node) -> Core:
    """pattern + check of the softmax core rooted at ``soft``; raises NoMatch with the reason."""
    r = rank(soft.outputs[0])
    axis = attr(soft, "axis", -1)
    if r not in (3, 4) or axis % r != r - 1:
        raise NoMatch(soft, "Softmax over the last (key) axis of [B,H,T,S] logits", f"axis {axis} of rank {r}")
    probs = through_cast(soft.outputs[0], upstream=False)
    uses = list(probs.uses())
    if not single_use(probs) or uses[0].node.op_type != "MatMul" or uses[0].idx != 0:
        found = ", ".join(f"{u.node.op_type} (input {u.idx})" for u in uses) or "a graph output"
        raise NoMatch(soft, "probabilities used once, as the left input of a MatMul with v", found)
    pv = uses[0].node
    logits, mask = _mask_chain(through_cast(soft.inputs[0], upstream=True), dims(soft.outputs[0]))
    if not single_use(logits):
        raise NoMatch(logits.producer(), "logits used once", f"{len(list(logits.uses()))} uses")
    inner, scale = scaled(logits)
    qk = producer(inner, "MatMul")
    if qk is None:
        raise NoMatch(soft, "logits = scale * MatMul(q, k^T)", found_op(inner))
    (q, qs), (kt, ks), v = scaled(qk.inputs[0]), scaled(qk.inputs[1]), pv.inputs[1]
    dq, dk, dv = dims(q), dims(kt), dims(v)
    if dq is None or dk is None or dv is None or not (len(dq) == len(dk) == len(dv) == r):
        raise NoMatch(qk, f"q, k^T, v of rank {r}", f"shapes {dq}, {dk}, {dv}")
    if not isinstance(dq[-1], int) or dq[-1] != dk[-2] or not isinstance(dv[-1], int):
        raise NoMatch(qk, "a product over a constant head dim (q [..,T,d] @ k^T [..,d,S])", f"{dq} @ {dk}")
    if not same_dim(dk[-1], dv[-2]):
        raise NoMatch(pv, "v's rows = the keys of k^T", f"k^T {dk}, v {dv}")
    if r == 4 and not (isinstance(dq[1], int) and dq[1] == dk[1] == dv[1]):
        raise NoMatch(qk, "the same constant head count on q, k, v (axis 1)", f"{dq[1]}, {dk[1]}, {dv[1]}")
    return Core(
        "softmax_core",
        pv,
        pv.outputs[0],
        q,
        kt,
        v,
        scale * qs * ks,
        mask.get("parts"),
        mask.get("allowed"),
        mask.get("negated", False),
        mask.get("bias"),
    )


def match_onnx_attention(node: ir.Node) -> Core:
    """pattern + check of an ONNX Attention-23 node on 4-D heads."""
    q, k, v = node.inputs[:3]
    dq, dk, dv = dims(q), dims(k), dims(v)
    extra = [i for i, x in enumerate(node.inputs[4:], 4) if x is not None] + [
        i for i, out in enumerate(node.outputs[1:], 1) if out.uses()
    ]
    if extra:
        raise NoMatch(node, "no past key / value and one output", f"inputs / outputs {extra}")
    if attr(node, "softcap", 0.0) or attr(node, "qk_matmul_output_mode", 0):
        raise NoMatch(node, "softcap 0 and qk_matmul_output_mode 0", "softcap or a logits output")
    if (
        dq is None
        or dk is None
        or dv is None
        or len(dq) != 4
        or not isinstance(dq[1], int)
        or not isinstance(dq[3], int)
        or not (dq[1] == dk[1] == dv[1])
    ):
        raise NoMatch(node, "4-D q, k, v [B,H,X,d] with one constant head count", f"{dq}, {dk}, {dv}")
    scale = attr(node, "scale", None)
    core = Core("onnx_attention", node, node.outputs[0], q, k, v, scale or float(dq[3]) ** -0.5, k=k)
    mask = node.inputs[3] if len(node.inputs) > 3 else None
    causal = int(attr(node, "is_causal", 0))
    if causal and not same_dim(dq[2], dk[2]):
        raise NoMatch(node, "is_causal on self-attention (T = S)", f"T {dq[2]}, S {dk[2]}")
    if mask is not None and mask.dtype == ir.DataType.BOOL:
        parts = allowed_parts(mask, dq[0], dq[2], dk[2])
        if parts is not None and causal and parts.get("causal"):
            raise NoMatch(node, "one causal mask", "is_causal and a causal attn_mask")
        if parts is not None:
            core.parts = {"kpm": parts.get("kpm"), "causal": causal or parts.get("causal", 0)}
        elif causal:
            raise NoMatch(node, "is_causal with no mask, or a recognised key padding mask", found_op(mask))
        else:
            core.allowed = mask
    else:
        core.bias, core.parts = mask, {"kpm": None, "causal": causal}
    return core


# ---------------------------------------------------------------------------------------------
# rewrite
# ---------------------------------------------------------------------------------------------
def _to_3d(b: Builder, x: ir.Value, perm: list[int], heads: int, head_dim: int, seq) -> ir.Value:
    """A heads tensor -> [B,X,H*d] (the split's source when x is a view + transpose of one)."""
    if perm == [0, 2, 1, 3]:
        src = split_heads_source(x, (0, 2, 1, 3))
        if src is not None:
            return src
    if perm == [0, 3, 1, 2]:
        src = split_heads_source(x, (0, 2, 3, 1))
        if src is not None:
            return src
    d = dims(x)
    t = b.op("Transpose", [x], {"perm": perm}, dtype=x.dtype, shape=[d[p] for p in perm])
    return b.op("Reshape", [t, b.ints([0, 0, heads * head_dim])], dtype=x.dtype, shape=(d[0], seq, heads * head_dim))


def _bias_4d(b: Builder, bias: ir.Value, q3: ir.Value, k3: ir.Value) -> ir.Value:
    """An additive mask broadcast to [B|1, H|1, T, S] (what MultiHeadAttention / Attention-23 take)."""
    r = rank(bias) or 0
    if r < 4:
        bias = b.op("Unsqueeze", [bias, b.ints(list(range(4 - r)))], dtype=bias.dtype, shape=None)
    return expand_to_logits(b, bias, q3, k3)


def rewrite(core: Core, target: str) -> None:
    """Replace the core by one fused op on [B,X,H*d] tensors."""
    b = Builder(core.anchor, "std_attn")
    dq, dv = dims(core.q), dims(core.v)
    four = len(dq) == 4
    heads, d, seq = (dq[1] if four else 1), dq[-1], dq[-2]
    if not four:
        q3, v3 = core.q, core.v
        k3 = b.op("Transpose", [core.kt], {"perm": [0, 2, 1]}, dtype=core.kt.dtype, shape=None)
    else:
        q3 = _to_3d(b, core.q, [0, 2, 1, 3], heads, d, seq)
        v3 = _to_3d(b, core.v, [0, 2, 1, 3], heads, dv[-1], dv[-2])
        k3 = (
            _to_3d(b, core.k, [0, 2, 1, 3], heads, d, dv[-2])
            if core.k is not None
            else _to_3d(b, core.kt, [0, 3, 1, 2], heads, d, dv[-2])
        )
    out_dims = (dq[0], seq, heads * dv[-1])
    allowed = core.allowed
    if core.negated:
        allowed = b.op("Not", [core.allowed], dtype=ir.DataType.BOOL, shape=dims(core.allowed))
    if core.bias is None:
        o3 = emit_fused_attention(b, target, q3, k3, v3, heads, core.scale, core.parts, allowed, out_dims)
        if core.rule == "onnx_attention" and (allowed is not None or (core.parts or {}).get("kpm") is not None):
            o3 = _zero_empty_rows(b, o3, allowed, (core.parts or {}).get("kpm"))
    else:
        o3 = _emit_with_bias(b, target, q3, k3, v3, heads, core, out_dims)
    target_value = merged_heads_target(core.out) if four else None
    if target_value is not None:
        replace_value(target_value, o3)
        return
    if four:
        o4 = b.op("Reshape", [o3, b.ints([0, 0, heads, dv[-1]])], dtype=o3.dtype, shape=None)
        o3 = b.op("Transpose", [o4], {"perm": [0, 2, 1, 3]}, dtype=o3.dtype, shape=dims(core.out))
    replace_value(core.out, o3)


def _zero_empty_rows(b: Builder, o3: ir.Value, allowed: ir.Value | None, kpm: ir.Value | None) -> ir.Value:
    """Attention-23 / SDPA semantics for a boolean mask: a query row with no allowed key is 0 (what
    PyTorch's SDPA and ORT's Attention-23 give), where the project's emitter makes it uniform."""
    dtype = o3.dtype
    if allowed is None:  # key padding [B,S] -> [B,1,1,S]
        allowed = b.op("Unsqueeze", [kpm, b.ints([1, 2])], dtype=ir.DataType.BOOL, shape=None)
    real = b.op("Cast", [allowed], {"to": dtype}, dtype=dtype, shape=None)
    has_key = b.op("ReduceMax", [real, b.ints([3])], {"keepdims": 1}, dtype=dtype, shape=None)  # [B|1,1,T|1,1]
    return b.op(
        "Mul", [o3, b.op("Squeeze", [has_key, b.ints([1])], dtype=dtype, shape=None)], dtype=dtype, shape=dims(o3)
    )


def _emit_with_bias(b: Builder, target: str, q3, k3, v3, heads: int, core: Core, out_dims) -> ir.Value:
    """A fused op with an additive float mask (plus at most causality)."""
    parts = core.parts or {}
    bias = _bias_4d(b, core.bias, q3, k3)
    causal = int(parts.get("causal", 0))
    if target == "ort":
        attrs = {"num_heads": heads, "scale": float(core.scale), "unidirectional": causal}
        return b.op(
            "MultiHeadAttention",
            [q3, k3, v3, None, None, bias],
            attrs,
            domain=MS_DOMAIN,
            dtype=q3.dtype,
            shape=out_dims,
        )
    attrs = {"q_num_heads": heads, "kv_num_heads": heads, "scale": float(core.scale), "is_causal": causal}
    return b.op("Attention", [q3, k3, v3, bias], attrs, dtype=q3.dtype, shape=out_dims)


def check_rewritable(core: Core, target: str) -> None:
    """The checks every rule shares before rewriting (raise NoMatch)."""
    parts = core.parts or {}
    if core.bias is not None and (parts.get("kpm") is not None or core.allowed is not None):
        raise NoMatch(
            core.anchor, "an additive mask with at most a causal boolean mask", "an additive and a padding mask"
        )
    if core.bias is not None and core.bias.dtype != core.q.dtype:
        raise NoMatch(core.anchor, f"an additive mask of q's type {core.q.dtype}", str(core.bias.dtype))
    if core.allowed is not None:
        d = dims(core.allowed)
        if d is None or len(d) != 4 or d[1] != 1:
            raise NoMatch(core.anchor, "a boolean mask [B|1, 1, T|1, S] (one for all heads)", str(d))
    if core.rule == "onnx_attention" and target != "ort":
        raise NoMatch(core.anchor, "target ort (Attention-23 is already the fused form here)", f"target {target}")


def match(node: ir.Node, target: str) -> Core:
    """The rule for ``node`` (Softmax or Attention), matched and checked; raises NoMatch."""
    core = match_softmax_core(node) if node.op_type == "Softmax" else match_onnx_attention(node)
    check_rewritable(core, target)
    return core


def fuse_standard_attention(model: ir.Model, target: str) -> int:
    """Fuse every standard attention core of every scope; returns how many fused."""
    count = 0
    for node in scope_nodes(model):
        if node.graph is None or node.domain != "" or node.op_type not in ("Softmax", "Attention"):
            continue
        try:
            core = match(node, target)
        except NoMatch:
            continue
        rewrite(core, target)
        count += 1
    if count:
        if target == "ort":
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        ir.passes.common.RemoveUnusedNodesPass()(model)
    return count


class FuseStandardAttentionPass(ir.passes.InPlacePass):
    """Standard attention cores -> fused attention for ``target``, then projection packing."""

    def __init__(self, target: str = "ort") -> None:
        super().__init__()
        self.target = target
        self.counts: dict[str, int] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        fused = fuse_standard_attention(model, self.target)
        packed = pack_projections(model) if fused else 0
        op = "MultiHeadAttention" if self.target == "ort" else "Attention"
        self.counts = {f"{op} (standard)": fused, "packed MatMul": packed}
        return ir.passes.PassResult(model, bool(fused))
