"""Standard attention as public code writes it -> one fused attention node, as rules.

Runs after :mod:`.lower_attention` (which keeps this project's own forms and their contract) on
what it left. Each rule is pattern -> check -> rewrite; every check raises
:class:`~attn2onnx.passes._match.NoMatch` naming the node, what was expected and what was found,
so :mod:`.explain` can say why a core stayed unfused.

* ``softmax_core``: ``softmax(mask(scale * q k^T)) @ v`` on heads [B,H,T,d] (or one head / heads
  folded into the batch, [B,T,d]), with any head layout (view + transpose, timm's packed qkv
  unbind, permutes), the products as MatMul or Einsum (``bhqd,bhkd->bhqk``, ``bqhd,bkhd->bhqk``,
  ``bhqk,bkhd->bqhd``, ...: an Einsum is the MatMul form up to the perms :class:`Core` records;
  the mix must contract the probabilities' key axis), the scale on q, k or the logits (Mul or
  Div), Casts around the Softmax (fp16 autocast), and as mask: a ``Where`` filling <= -1e4
  (either branch; ``masked_fill(bias[:, :, :T, :T] == 0, -inf)`` on a registered tril buffer and
  ``masked_fill(triu(ones(T, T), 1), -inf)`` are recognised as causal, ``masked_fill(kpm[:, None,
  None, :], -inf)`` with the padding input itself as condition as a "True = pad" key padding mask;
  two such masked_fills in a row are one mask), and / or an additive float bias (HF BERT / GPT-2 / Llama ``finfo.min``
  masks; Llama's ``triu(full(finfo.min), 1)`` is recognised as causal). Heads folded into the batch
  (logits [B*H,T,S]: fairseq, torch.bmm code) run as one head per folded row; their masks: a [T,S]
  causal one (boolean, or additive -inf / finfo.min) as causal mode, fairseq's key padding on a
  [B,H,T,S] view (``view -> masked_fill -> view``) as a key padding mask repeated per head, a bias
  that differs along B*H (BLOOM's folded ALiBi [B*H,1,S]) as a per-row bias; a mask that differs per
  head on the view is refused.
* ``onnx_attention``: ONNX ``Attention`` (opset 23, what torch exports for
  ``F.scaled_dot_product_attention`` and ``nn.MultiheadAttention``) on 4-D heads, for target ``ort``;
  torch's float form of a boolean causal mask is recognised as causal.

Grouped-query attention (H/g key / value heads): keys and values repeated to every head
(HF's ``repeat_kv`` expand + reshape, ``repeat_interleave``) are read unrepeated, and SDPA's
``enable_gqa`` node has them so. Causal self-attention with no other mask becomes
``com.microsoft.GroupQueryAttention`` (its CPU kernel is causal only); any other grouped core
repeats K / V once on [B,S,Hkv*d] for MultiHeadAttention / Attention-23.

Target ``ort`` gets ``com.microsoft.MultiHeadAttention`` (a causal mask as its ``unidirectional``
mode, padding as ``key_padding_mask``, else an ``attention_bias``); ``trt`` / ``portable`` get
ONNX Attention-23, and every Attention-23 mask there has the full query axis (ORT's CPU kernel
rejects the [B,H|1,1,S] masks torch exports). Boolean masks go through
:func:`.lower_attention.emit_fused_attention`, so rows with no allowed key keep the project's
contract (uniform); where PyTorch fills with -inf such rows are NaN in PyTorch and any value here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ._ir_utils import (
    Builder,
    _scope_of,
    attr,
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
    additive_causal,
    allowed_parts,
    negated_parts,
    found_op,
    einsum_mix,
    einsum_qk,
    inverse_perm,
    merged_heads_target,
    merge_parts,
    perm_of,
    permuted,
    repeated_heads,
    scaled,
    single_use,
    split_heads_source,
    through_cast,
    transposed,
)
from . import native_attention
from .lower_attention import MS_DOMAIN, NEG, emit_fused_attention, guard_empty_rows, pack_projections
from .lower_attention import _allowed_from_parts as allowed_from_parts

FILL_LIMIT = -1e4  # a Where fill at or below this is a mask (exp underflows to 0 in fp16 and fp32)


@dataclass
class Core:
    """One matched attention core. q, k^T, v and the output are the graph's values; each perm says
    how Transpose(value, perm) gives the canonical heads-first layout q [B,H,T,d], k^T [B,H,d,S],
    v [B,H,S,d] (or, one head / heads folded into the batch, [B,T,d], [B,d,S], [B,S,d]); the output
    is Transpose(canonical [B,H,T,dv], out_perm). Einsum cores and ONNX Attention's untransposed
    keys differ from the MatMul form only in these perms."""

    rule: str
    anchor: ir.Node  # the node the fused op is inserted before
    out: ir.Value  # the core's output, replaced by the fused op's
    q: ir.Value
    kt: ir.Value
    v: ir.Value
    scale: float
    parts: dict | None = None  # recognised boolean mask: {"kpm": [B,S] | None, "causal": 0 | 1}
    allowed: ir.Value | None = None  # an unrecognised boolean mask [B|1,1,T|1,S]
    negated: bool = False  # ``allowed`` holds the disallowed positions (Where(c, fill, x))
    bias: ir.Value | None = None  # an additive float mask
    more_bias: tuple = ()  # further additive masks on the same logits (T5: relative position bias + padding)
    view_bias: ir.Value | None = None  # an additive mask [B|1,H|1,T|1,S] on the view of folded logits (BLOOM)
    q_perm: tuple | None = None  # None: the value is already canonical
    kt_perm: tuple | None = None
    v_perm: tuple | None = None
    out_perm: tuple | None = None
    kpm_heads: int = 1  # heads folded into the batch: each kpm row serves this many rows (b*H + h)
    softcap: float = 0.0  # logits = softcap * tanh(scale * q k^T / softcap) before the mask (Gemma 2)
    zero_empty: bool = False  # a query row with no allowed key is 0 (SDPA's; ONNX Attention's boolean masks)

    def biases(self) -> list[ir.Value]:
        """Every additive mask of the core (its own level's, then the folded view's)."""
        return [x for x in (self.bias, *self.more_bias, self.view_bias) if x is not None]

    def canonical(self, name: str) -> tuple | None:
        """dims of q / kt / v / out in the canonical layout."""
        perm = getattr(self, f"{name}_perm")
        d = dims(getattr(self, name))
        return d if perm is None or d is None else permuted(d, inverse_perm(perm) if name == "out" else perm)


# ---------------------------------------------------------------------------------------------
# pattern + check: softmax cores
# ---------------------------------------------------------------------------------------------
def _fill(value: ir.Value) -> float | None:
    c = const_scalar(value)
    return c if c is not None and c <= FILL_LIMIT else None


def _bool_mask(where: ir.Node, logits_dims: tuple) -> tuple[ir.Value, dict | None, ir.Value | None, bool]:
    """where(allowed, x, fill) or where(disallowed, fill, x) -> (x, parts, unrecognised mask, negated)."""
    cond, a, b = where.inputs
    if _fill(b) is not None:
        x, negated = a, False
    elif _fill(a) is not None:
        x, negated = b, True
    else:
        raise NoMatch(
            where,
            f"a Where filling masked logits with a constant <= {FILL_LIMIT:g}",
            f"fill values {const_scalar(a)} / {const_scalar(b)}",
        )
    # rank-3 logits [N,T,S]: a mask of rank <= 3 is read as causal only (kpm needs [B,1,1,S]), uniform over N
    parts = (negated_parts if negated else allowed_parts)(cond, logits_dims[0], logits_dims[-2], logits_dims[-1])
    if parts is not None:
        return x, parts, None, False
    nt = producer(cond, "Not") if negated else None
    return (x, None, nt.inputs[0], False) if nt is not None else (x, None, cond, negated)


def _logits_side(add: ir.Node) -> int:
    """Which input of an Add is the logits (the other is an additive mask)."""
    out = dims(add.outputs[0])
    for ops in (("MatMul", "Einsum", "Where", "Add", "Tanh"), ("Reshape",)):  # Tanh: soft-capped; Reshape: BLOOM's view
        for i in (0, 1):
            if dims(add.inputs[i]) == out and found_op(scaled(add.inputs[i])[0]) in ops:
                return i
    raise NoMatch(add, "logits plus an additive mask", f"inputs {found_op(add.inputs[0])} + {found_op(add.inputs[1])}")


def _mask_chain(value: ir.Value, logits_dims: tuple) -> tuple[ir.Value, dict]:
    """Peel masks off the softmax input: Where fills, additive biases and, on logits with the heads
    folded into the batch, a [B,H,T,S] view of them with its masks -> (logits, mask parts)."""
    found: dict = {}
    while True:
        node = producer(value, ("Where", "Add", "Reshape"))
        view = node is not None and node.op_type == "Reshape" and _folded_view(node, logits_dims)
        if node is None or (node.op_type == "Reshape" and not view):
            return value, _as_boolean(found, logits_dims)
        if not single_use(value):
            raise NoMatch(node, "masked logits used once (by the Softmax)", f"{len(list(value.uses()))} uses")
        if view:
            if "where" in found or "heads" in found:
                raise NoMatch(node, "one boolean mask", "a Where mask and a masked [B,H,T,S] view")
            value = _view_masks(node, found)
        elif node.op_type == "Where":
            value, parts, allowed, negated = _bool_mask(node, logits_dims)
            if "where" in found:  # masked_fill after masked_fill: one mask if both are recognised
                merged = merge_parts([found["parts"], parts]) if found["parts"] and parts else None
                if merged is None:
                    raise NoMatch(node, "one boolean mask (or recognised ones: padding and causal)", "two Where masks")
                found["parts"] = merged
            else:
                found["parts"], found["allowed"], found["negated"] = parts, allowed, negated
            found["where"] = node
        else:  # additive masks, outermost first: T5 adds its relative position bias, then the padding mask
            i = _logits_side(node)
            value = node.inputs[i]
            found["more_bias"] = (*found.get("more_bias", ()), found["bias"]) if "bias" in found else ()
            found["bias"] = node.inputs[1 - i]


def _as_boolean(found: dict, logits_dims: tuple) -> dict:
    """The masks found, with a lone additive mask Where(allowed, 0, fill) read as the boolean
    mask it adds (:func:`_additive_boolean`) where there is no other mask."""
    bias = found.get("bias")
    alone = bias is not None and not found.get("more_bias") and set(found) <= {"bias", "more_bias"}
    parts = _additive_boolean(bias, logits_dims) if alone else None
    return found if parts is None else {"parts": parts, "allowed": None, "negated": False, "where": bias.producer()}


def _additive_boolean(bias: ir.Value, logits_dims: tuple) -> dict | None:
    """bias = Where(allowed, 0, fill <= FILL_LIMIT) of a recognised key padding / causal mask
    (torch.onnx's opset-18 SDPA adds its boolean attn_mask so) -> the mask's parts; else None.
    Adding it is filling with it: a masked logit's weight is 0 either way, and a row with no
    allowed key is the contract's (or, with :func:`_nan_guard`, SDPA's zeros)."""
    where = producer(bias, "Where")
    if where is None or const_scalar(where.inputs[1]) != 0 or _fill(where.inputs[2]) is None:
        return None
    return allowed_parts(where.inputs[0], logits_dims[0], logits_dims[-2], logits_dims[-1])


def _folded_view(back: ir.Node, logits_dims: tuple) -> bool:
    """Whether back = Reshape([B,H,T,S] -> [N,T,S]) with a constant H, T and S kept: the end of
    fairseq's ``w.view(B, H, T, S).masked_fill(..).view(B * H, T, S)`` on folded logits [N,T,S]."""
    d4, d3 = dims(back.inputs[0]), logits_dims
    if len(d3) != 3 or d4 is None or len(d4) != 4 or not isinstance(d4[1], int):
        return False
    return same_dim(d4[2], d3[1]) and same_dim(d4[3], d3[2])


def _view_masks(back: ir.Node, found: dict) -> ir.Value:
    """The masks on a [B,H,T,S] view of folded logits (:func:`_folded_view`) into ``found``: key
    padding [B,S] (``heads``: each of its rows serves H folded rows; both Reshapes keep T and S, so
    folded row n is (b, h) = (n // H, n % H)) and / or causality, the masks that are the same for
    every head; -> the folded logits [N,T,S] under the view. Raises NoMatch for any other mask
    (one per head, an additive one) or where the view is not of folded logits."""
    d4 = dims(back.inputs[0])
    logits4, inner = _mask_chain(back.inputs[0], d4)
    inner = _causal_bias_as_mode(inner, d4)
    view = producer(logits4, "Reshape")
    dv = dims(view.inputs[0]) if view is not None else None
    if dv is None or len(dv) != 3 or not (same_dim(dv[1], d4[2]) and same_dim(dv[2], d4[3])):
        raise NoMatch(
            back, "a [B,H,T,S] view of folded logits [B*H,T,S] (Reshape, masks, Reshape back)", found_op(logits4)
        )
    mask = inner.get("bias") or inner.get("allowed")
    if mask is not None:
        raise NoMatch(
            back,
            "a key padding and / or causal mask on the [B,H,T,S] view of folded logits (one for all heads)",
            f"{found_op(mask)} {dims(mask)}",
        )
    if not single_use(logits4):
        raise NoMatch(view, "the [B,H,T,S] view used once", f"{len(list(logits4.uses()))} uses")
    found.update({key: inner[key] for key in ("parts", "where") if key in inner}, heads=d4[1])
    return view.inputs[0]


def _mix(soft: ir.Node, r: int) -> tuple[ir.Node, ir.Value, tuple | None, tuple | None, bool]:
    """The probabilities' one use: MatMul(probs, v) or an Einsum mix -> (node, v, v perm, out perm,
    whether NaN rows are zeroed). Probabilities [B,H,T,S] viewed back as folded heads [B*H,T,S]
    (BLOOM) are read through that Reshape (see :func:`_unview`), and torch.onnx's SDPA guard
    ``Where(IsNaN(p), 0, p)`` (a row with no allowed key is 0, as SDPA gives it) through that Where."""
    probs = through_cast(soft.outputs[0], upstream=False)
    guard = _nan_guard(probs)
    probs = guard if guard is not None else probs
    fold = _folding_use(probs) if r == 4 else None
    probs = fold.outputs[0] if fold is not None else probs
    uses = list(probs.uses())
    use = uses[0] if single_use(probs) else None
    if use is not None and use.node.domain == "" and use.node.op_type == "Einsum" and len(use.node.inputs) == 2:
        v_perm, out_perm = einsum_mix(use.node, use.idx, r)
        return use.node, use.node.inputs[1 - use.idx], v_perm, out_perm, guard is not None
    if use is None or use.node.op_type != "MatMul" or use.idx != 0:
        found = ", ".join(f"{u.node.op_type} (input {u.idx})" for u in uses) or "a graph output"
        raise NoMatch(soft, "probabilities used once, as the left input of a MatMul (or an Einsum) with v", found)
    return use.node, use.node.inputs[1], None, None, guard is not None


def _nan_guard(probs: ir.Value) -> ir.Value | None:
    """probs used only by ``Where(IsNaN(probs), 0, probs)`` (torch.onnx's opset-18 SDPA with a
    boolean mask) -> that Where's output; else None."""
    uses = {(u.node.op_type, u.idx): u.node for u in probs.uses()}
    nan, where = uses.get(("IsNaN", 0)), uses.get(("Where", 2))
    if probs.is_graph_output() or len(uses) != 2 or nan is None or where is None:
        return None
    ok = where.inputs[0] is nan.outputs[0] and single_use(nan.outputs[0]) and const_scalar(where.inputs[1]) == 0
    return where.outputs[0] if ok else None


def _folding_use(probs: ir.Value) -> ir.Node | None:
    """probs [B,H,T,S] -> its one use, a Reshape to folded heads [N,T,S] keeping T and S; else None."""
    uses = list(probs.uses())
    node = uses[0].node if single_use(probs) else None
    if node is None or node.op_type != "Reshape" or node.domain != "" or uses[0].idx != 0:
        return None
    return node if _folds(dims(node.outputs[0]), dims(probs)) else None


def _folds(d3: tuple | None, d4: tuple | None) -> bool:
    """Whether [N,T,S] and [B,H,T,X] (H constant) are views of one tensor with N = B*H and T kept,
    so X = S (a Reshape keeps the element count; torch may name X ``((seq**2)//seq)``)."""
    if d3 is None or d4 is None or len(d3) != 3 or len(d4) != 4 or not isinstance(d4[1], int):
        return False
    n, batch, heads = d3[0], d4[0], d4[1]
    if isinstance(n, int) and isinstance(batch, int):
        folded = n == batch * heads
    else:
        folded = isinstance(n, str) and isinstance(batch, str) and same_dim(n, f"{heads}*{batch}")
    return folded and same_dim(d3[1], d4[2])


def _unview(soft: ir.Node, logits4: ir.Value, mask: dict) -> tuple[ir.Value, dict]:
    """BLOOM's layout: folded logits [N=B*H,T,S] (with their own masks: the folded ALiBi bias
    [N,1,S] of ``baddbmm``) viewed as [B,H,T,S] for the mask and the softmax, the probabilities
    viewed back before the bmm with v. -> (the folded logits, the masks of both levels as one
    folded core's: the view's additive mask becomes ``view_bias``, its boolean key padding /
    causal masks rows repeated per head, as fairseq's view masks). Raises NoMatch."""
    view = producer(logits4, "Reshape")
    d4, d3 = dims(logits4), dims(view.inputs[0]) if view is not None else None
    if not _folds(d3, d4):
        raise NoMatch(
            soft,
            "softmax on a [B,H,T,S] view of folded logits [B*H,T,S] (probabilities viewed back)",
            found_op(logits4),
        )
    if mask.get("allowed") is not None or mask.get("more_bias"):
        raise NoMatch(soft, "one mask for all heads on the [B,H,T,S] view (additive, or padding / causal)", "more")
    if not single_use(logits4):
        raise NoMatch(view, "the [B,H,T,S] view used once", f"{len(list(logits4.uses()))} uses")
    logits3, inner = _mask_chain(through_cast(view.inputs[0], upstream=True), d3)
    inner = _causal_bias_as_mode(inner, d3)
    if inner.get("allowed") is not None:
        raise NoMatch(view, "a causal mask on folded logits", f"{found_op(inner['allowed'])} {dims(inner['allowed'])}")
    parts = [p for p in (mask.get("parts"), inner.get("parts")) if p]
    merged = merge_parts(parts) if parts else None
    if parts and merged is None:
        raise NoMatch(soft, "one key padding mask", "two")
    folded = {**inner, "parts": merged, "view_bias": mask.get("bias"), "heads": d4[1]}
    return logits3, folded


def _qk(
    soft: ir.Node, inner: ir.Value, r: int
) -> tuple[ir.Node, ir.Value, ir.Value, float, tuple | None, tuple | None]:
    """The logits' product: MatMul(q, k^T) or an Einsum -> (node, q, k^T, scale on them, q perm, kt perm)."""
    qk = producer(inner, ("MatMul", "Einsum"))
    if qk is None or len(qk.inputs) != 2:
        raise NoMatch(soft, "logits = scale * MatMul(q, k^T) (or an Einsum q·k)", found_op(inner))
    (q, qs), (kt, ks) = scaled(qk.inputs[0]), scaled(qk.inputs[1])
    perms = einsum_qk(qk, r) if qk.op_type == "Einsum" else (None, None)
    return qk, q, kt, qs * ks, *perms


def match_softmax_core(soft: ir.Node) -> Core:
    """pattern + check of the softmax core rooted at ``soft``; raises NoMatch with the reason."""
    r = rank(soft.outputs[0])
    axis = attr(soft, "axis", -1)
    if r not in (3, 4) or axis % r != r - 1:
        over = ": softmax over queries: no fused kernel" if r in (3, 4) and axis % r == r - 2 else ""
        raise NoMatch(soft, "Softmax over the last (key) axis of [B,H,T,S] logits", f"axis {axis} of rank {r}{over}")
    pv, v, v_perm, out_perm, zero_empty = _mix(soft, r)
    logits, mask = _mask_chain(through_cast(soft.inputs[0], upstream=True), dims(soft.outputs[0]))
    logits = through_cast(logits, upstream=True)  # fp16 logits cast up to fp32 before the mask (the contract)
    if rank(v) == 3 and r == 4:  # probabilities viewed back to folded heads: BLOOM's layout
        logits, mask = _unview(soft, logits, mask)
        r = 3
    if logits.dtype != v.dtype:
        raise NoMatch(soft, "logits in the precision of v (the fused op has one)", f"{logits.dtype} and {v.dtype}")
    if not single_use(logits):
        raise NoMatch(logits.producer(), "logits used once", f"{len(list(logits.uses()))} uses")
    mask = _causal_bias_as_mode(mask, dims(logits))
    inner, scale, softcap = _soft_capped(logits)
    qk, q, kt, qk_scale, q_perm, kt_perm = _qk(soft, inner, r)
    core = Core(
        "softmax_core",
        pv,
        pv.outputs[0],
        q,
        kt,
        v,
        scale * qk_scale,
        mask.get("parts"),
        mask.get("allowed"),
        mask.get("negated", False),
        mask.get("bias"),
        q_perm=q_perm,
        kt_perm=kt_perm,
        v_perm=v_perm,
        out_perm=out_perm,
        kpm_heads=mask.get("heads", 1),
        more_bias=mask.get("more_bias", ()),
        view_bias=mask.get("view_bias"),
        softcap=softcap,
        zero_empty=zero_empty,
    )
    if r == 4:
        _ungroup_kv(core)
    _check_shapes(core, qk, pv, r)
    return core


def _soft_capped(logits: ir.Value) -> tuple[ir.Value, float, float]:
    """logits = scale * inner -> (inner, scale, 0.0); Gemma 2's tanh soft-capping, logits =
    cap * tanh(s * inner / cap) (``attn / cap -> tanh -> * cap``) -> (inner, s, cap)."""
    inner, scale = scaled(logits)
    tanh = producer(inner, "Tanh")
    if tanh is None or not single_use(inner) or scale <= 0:
        return inner, scale, 0.0
    x, factor = scaled(tanh.inputs[0])
    return x, factor * scale, scale


def _causal_bias_as_mode(mask: dict, logits_dims: tuple) -> dict:
    """An additive causal mask (Llama's ``triu(full(finfo.min), 1)``) becomes the causal part of a
    recognised mask, so the fused op runs in its causal mode instead of adding a [T,S] bias; it
    stays a bias beside an unrecognised boolean mask."""
    bias = mask.get("bias")
    if bias is None or mask.get("allowed") is not None or mask.get("more_bias"):
        return mask
    if not additive_causal(bias, logits_dims[-2], logits_dims[-1], FILL_LIMIT):
        return mask
    parts = mask.get("parts") or {"kpm": None}
    return {**mask, "bias": None, "parts": {**parts, "causal": 1}}


def _ungroup_kv(core: Core) -> None:
    """Grouped-query keys / values repeated to every head (repeat_kv) -> the unrepeated ones, so
    the fused op reads each K/V head once."""
    k4 = core.kt if core.kt_perm == (0, 1, 3, 2) else None
    if core.kt_perm is None and (t := producer(core.kt, "Transpose")) is not None and perm_of(t) == (0, 1, 3, 2):
        k4 = t.inputs[0]
    if k4 is None and core.kt_perm is None:
        k4 = _folded_transpose_source(core.kt)
    k_src = repeated_heads(k4) if k4 is not None else None
    v_src = repeated_heads(core.v) if core.v_perm is None else None
    if k_src is None or v_src is None or k_src[1] != v_src[1]:
        return
    core.kt, core.kt_perm, core.v = k_src[0], (0, 1, 3, 2), v_src[0]


def _folded_transpose_source(kt: ir.Value) -> ir.Value | None:
    """kt [B,H,d,S] = Reshape(Transpose(Reshape(k [B,H,S,d], [B*H,S,d]), (0, 2, 1)), [B,H,d,S])
    (torch.onnx's opset-18 SDPA transposes k so) -> k; else None."""
    back = producer(kt, "Reshape")
    t = producer(back.inputs[0], "Transpose") if back is not None else None
    fold = producer(t.inputs[0], "Reshape") if t is not None and perm_of(t) == (0, 2, 1) else None
    if fold is None:
        return None
    k, dk, dt = fold.inputs[0], dims(fold.inputs[0]), dims(kt)
    if dk is None or dt is None or len(dk) != 4 or len(dt) != 4:
        return None
    same = all(same_dim(a, b) for a, b in ((dk[0], dt[0]), (dk[1], dt[1]), (dk[2], dt[3]), (dk[3], dt[2])))
    return k if same and isinstance(dk[1], int) else None


def _check_shapes(core: Core, qk: ir.Node, pv: ir.Node, r: int) -> None:
    """q [..,T,d] @ k^T [..,d,S], v [..,S,dv], one constant head count (rank 4); raises NoMatch."""
    dq, dk, dv = core.canonical("q"), core.canonical("kt"), core.canonical("v")
    if dq is None or dk is None or dv is None or not (len(dq) == len(dk) == len(dv) == r):
        raise NoMatch(qk, f"q, k^T, v of rank {r}", f"shapes {dq}, {dk}, {dv}")
    if not isinstance(dq[-1], int) or dq[-1] != dk[-2] or not isinstance(dv[-1], int):
        raise NoMatch(qk, "a product over a constant head dim (q [..,T,d] @ k^T [..,d,S])", f"{dq} @ {dk}")
    if not same_dim(dk[-1], dv[-2]):
        raise NoMatch(pv, "v's rows = the keys of k^T", f"k^T {dk}, v {dv}")
    if r == 4 and not (isinstance(dq[1], int) and isinstance(dk[1], int) and dk[1] == dv[1] and dq[1] % dk[1] == 0):
        raise NoMatch(qk, "constant head counts on q, k, v (axis 1; k, v: H or H/g)", f"{dq[1]}, {dk[1]}, {dv[1]}")


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
        or not (dk[1] == dv[1] and isinstance(dk[1], int) and dq[1] % dk[1] == 0)
    ):
        raise NoMatch(node, "4-D q, k, v [B,H,X,d] with constant head counts (k, v: H or H/g)", f"{dq}, {dk}, {dv}")
    scale = attr(node, "scale", None)
    core = Core("onnx_attention", node, node.outputs[0], q, k, v, scale or float(dq[3]) ** -0.5, kt_perm=(0, 1, 3, 2))
    core.zero_empty = True
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
    elif mask is not None and not causal and additive_causal(mask, dq[2], dk[2], FILL_LIMIT):
        core.parts = {"kpm": None, "causal": 1}  # torch's float form of nn.MultiheadAttention's causal mask
    else:
        core.bias, core.parts = mask, {"kpm": None, "causal": causal}
    _ungroup_kv(core)
    return core


# ---------------------------------------------------------------------------------------------
# rewrite
# ---------------------------------------------------------------------------------------------
def _to_3d(b: Builder, x: ir.Value, perm: tuple, heads: int, head_dim: int) -> ir.Value:
    """Transpose(x, perm) = [B,X,H,d] -> [B,X,H*d]: the split's source where x is a view (+
    transpose) of one, else one Transpose (through the chain that made x) and a Reshape."""
    inv = inverse_perm(perm)
    src = split_heads_source(x, inv) if inv != (0, 1, 2, 3) else _viewed_source(x)
    if src is not None:
        return src
    t = transposed(b, x, list(perm))
    d = dims(t)
    shape = None if d is None else (d[0], d[1], heads * head_dim)
    return b.op("Reshape", [t, b.ints([0, 0, heads * head_dim])], dtype=x.dtype, shape=shape)


def _viewed_source(x: ir.Value) -> ir.Value | None:
    """x = Reshape(src [B,X,H*d]) to [B,X,H,d] -> src."""
    node = producer(x, "Reshape")
    d3, d4 = dims(node.inputs[0]) if node is not None else None, dims(x)
    if d3 is None or d4 is None or len(d3) != 3 or len(d4) != 4 or not all(isinstance(v, int) for v in d4[2:]):
        return None
    ok = d3[2] == d4[2] * d4[3] and same_dim(d3[0], d4[0]) and same_dim(d3[1], d4[1])
    return node.inputs[0] if ok else None


def _compose(perm: tuple | None, then: tuple) -> tuple:
    """The perm of Transpose(Transpose(x, perm), then)."""
    return then if perm is None else tuple(perm[p] for p in then)


def _bias_4d(b: Builder, bias: ir.Value, q3: ir.Value, k3: ir.Value, logits_rank: int) -> ir.Value:
    """An additive mask broadcast to [B|1, H|1, T, S] (what MultiHeadAttention / Attention-23 take).
    On logits [N,T,S] (one head, or heads folded into the batch) the bias's leading axis is N's:
    [N|1, T|1, S] -> [N|1, 1, T|1, S] (a per-row bias, such as BLOOM's folded ALiBi, stays per row)."""
    r = rank(bias) or 0
    axes = list(range(4 - r)) if logits_rank == 4 or r < 3 else [1]
    if r < 4:
        bias = b.op("Unsqueeze", [bias, b.ints(axes)], dtype=bias.dtype, shape=None)
    return expand_to_logits(b, bias, q3, k3)


def _core_bias(b: Builder, core: Core, q3: ir.Value, k3: ir.Value) -> ir.Value:
    """The core's additive masks summed into one attention_bias [B|1,H|1,T,S] (on folded heads
    [N|1,1,T,S]); a mask on the [B,H,T,S] view of folded logits is folded first (:func:`_fold_view_bias`)."""
    total = None
    for x in core.biases():
        if x is core.view_bias:
            x = _fold_view_bias(b, x, core.kpm_heads, q3)
        if total is not None:  # the sum's rank is the larger one (broadcast): _bias_4d reads it
            x = b.op("Add", [total, x], dtype=x.dtype, shape=(None,) * max(rank(total) or 4, rank(x) or 4))
        total = x
    return _bias_4d(b, total, q3, k3, len(core.canonical("q")))


def _fold_view_bias(b: Builder, bias: ir.Value, heads: int, q3: ir.Value) -> ir.Value:
    """An additive mask [B|1,H|1,T|1,S] on the [B,H,T,S] view of folded logits -> [N=B*H,T|1,S],
    row b*H + h = its (b, h) (both views keep T and S, so folded row n is (n // H, n % H)); B is
    read as N / H from the folded q [N,T,d]."""
    i64 = ir.DataType.INT64
    if (rank(bias) or 4) < 4:
        bias = b.op("Unsqueeze", [bias, b.ints(list(range(4 - rank(bias))))], dtype=bias.dtype, shape=None)
    rows = b.op("Shape", [q3], {"start": 0, "end": 1}, dtype=i64, shape=(1,))
    batch = b.op("Div", [rows, b.ints([heads])], dtype=i64, shape=(1,))
    tail = b.op("Shape", [bias], {"start": 2}, dtype=i64, shape=(2,))
    shape = b.op("Concat", [batch, b.ints([heads]), tail], {"axis": 0}, dtype=i64, shape=(4,))
    full = b.op("Expand", [bias, shape], dtype=bias.dtype, shape=None)
    folded_shape = b.op("Concat", [b.ints([-1]), tail], {"axis": 0}, dtype=i64, shape=(3,))
    return b.op("Reshape", [full, folded_shape], dtype=bias.dtype, shape=(None, None, None))


def _folded_kpm(b: Builder, kpm: ir.Value, heads: int) -> ir.Value:
    """A key padding mask [B,S] for logits with the heads folded into the batch: [B*H,S], row
    b*H + h = row b (each row repeated per head, as the [B,H,T,S] view reads it)."""
    rows = b.op("Unsqueeze", [kpm, b.ints([1])], dtype=kpm.dtype, shape=None)
    rows = b.op("Expand", [rows, b.ints([1, heads, 1])], dtype=kpm.dtype, shape=None)
    return b.op("Flatten", [rows], {"axis": 2}, dtype=kpm.dtype, shape=None)


def rewrite(core: Core, target: str, native: bool = False) -> None:
    """Replace the core by one fused op on [B,X,H*d] tensors."""
    b = Builder(core.anchor, "std_attn")
    if (core.parts or {}).get("kpm_pads"):  # a "True = pad" mask: the fused ops take True = real
        real = b.op("Not", [core.parts["kpm"]], dtype=ir.DataType.BOOL, shape=dims(core.parts["kpm"]))
        core.parts = {**core.parts, "kpm": real, "kpm_pads": False}
    dq, dv = core.canonical("q"), core.canonical("v")
    four = len(dq) == 4
    heads, kv_heads, d = (dq[1] if four else 1), (dv[1] if four else 1), dq[-1]
    if four:
        q3 = _to_3d(b, core.q, _compose(core.q_perm, (0, 2, 1, 3)), heads, d)
        k3 = _to_3d(b, core.kt, _compose(core.kt_perm, (0, 3, 1, 2)), kv_heads, d)
        v3 = _to_3d(b, core.v, _compose(core.v_perm, (0, 2, 1, 3)), kv_heads, dv[-1])
    else:
        if core.kpm_heads > 1 and (core.parts or {}).get("kpm") is not None:
            core.parts = {**core.parts, "kpm": _folded_kpm(b, core.parts["kpm"], core.kpm_heads)}
        q3 = transposed(b, core.q, list(core.q_perm or (0, 1, 2)))
        k3 = transposed(b, core.kt, list(_compose(core.kt_perm, (0, 2, 1))))
        v3 = transposed(b, core.v, list(core.v_perm or (0, 1, 2)))
    out_dims = (dq[0], dq[-2], heads * dv[-1])
    o3 = emit(b, target, core, q3, k3, v3, (heads, kv_heads, d, dv[-1]), out_dims, native)
    _replace_output(b, core, o3, heads, dv[-1])


def emit(b: Builder, target: str, core: Core, q3, k3, v3, sizes: tuple, out_dims, native: bool = False) -> ir.Value:
    """The one place that chooses the fused op for a matched core on q [B,T,H*d], k / v
    [B,S,Hkv*d]: ``sizes`` = (H, Hkv, d, dv). Grouped K/V (Hkv < H) or tanh soft-capping on
    target ort -> GroupQueryAttention (:func:`gqa_fits`); otherwise K/V repeated to H heads and
    MultiHeadAttention (ort) / Attention-23 (trt, portable; its ``softcap`` for soft-capping).
    ONNX Attention's boolean masks keep SDPA's zero rows where no key is allowed. With ``native``
    (target ort), a core whose class measured faster on the native kernel becomes StandardAttention
    on the K/V heads as they are (passes/native_attention.py)."""
    heads, kv_heads, d, dv = sizes
    allowed = core.allowed
    if core.negated:
        allowed = b.op("Not", [core.allowed], dtype=ir.DataType.BOOL, shape=dims(core.allowed))
    plain = not core.biases() and not core.softcap
    if plain and native_attention.choose(target, core.parts, allowed, d, out_dims[1], native):
        o3 = native_attention.emit(b, q3, k3, v3, heads, kv_heads, core.scale, core.parts, out_dims)
    elif (kv_heads != heads or core.softcap) and gqa_fits(core, target):
        o3 = _group_query_attention(b, core, q3, k3, v3, allowed, (heads, kv_heads), out_dims)
    else:
        if kv_heads != heads:
            k3, v3 = (_repeat_heads(b, x, kv_heads, heads // kv_heads, w) for x, w in ((k3, d), (v3, dv)))
        if not core.biases():
            o3 = emit_fused_attention(b, target, q3, k3, v3, heads, core.scale, core.parts, allowed, out_dims)
        else:
            o3 = _emit_with_bias(b, target, q3, k3, v3, heads, core, out_dims)
        if core.softcap:  # targets trt / portable: Attention-23 caps scale * q k^T before its mask, as Gemma 2
            o3.producer().attributes["softcap"] = ir.AttrFloat32("softcap", float(core.softcap))
    if core.zero_empty and (allowed is not None or (core.parts or {}).get("kpm") is not None):
        o3 = _zero_empty_rows(b, o3, allowed, (core.parts or {}).get("kpm"))
    return o3


def _replace_output(b: Builder, core: Core, o3: ir.Value, heads: int, dv: int) -> None:
    """Point the core's output (or the head merge that follows it) at the fused op's [B,T,H*dv]."""
    if len(core.canonical("out")) == 3:
        replace_value(core.out, transposed(b, o3, list(core.out_perm or (0, 1, 2))))
        return
    perm = _compose((0, 2, 1, 3), core.out_perm or (0, 1, 2, 3))  # the output from [B,T,H,dv]
    merged = {(0, 2, 1, 3): merged_heads_target, (0, 1, 2, 3): _merged_view_target}.get(perm, lambda _: None)
    target_value = merged(core.out)
    if target_value is not None:
        replace_value(target_value, o3)
        return
    d3 = dims(o3)
    shape = None if d3 is None else (d3[0], d3[1], heads, dv)
    o4 = b.op("Reshape", [o3, b.ints([0, 0, heads, dv])], dtype=o3.dtype, shape=shape)
    replace_value(core.out, transposed(b, o4, list(perm)))


def _merged_view_target(o: ir.Value) -> ir.Value | None:
    """o [B,T,H,d] -> Reshape [B,T,H*d]: the Reshape's output."""
    uses = list(o.uses())
    if not single_use(o) or uses[0].node.op_type != "Reshape" or uses[0].idx != 0:
        return None
    out = uses[0].node.outputs[0]
    d, do = dims(out), dims(o)
    ok = d is not None and do is not None and len(d) == 3 and isinstance(do[2], int) and isinstance(do[3], int)
    return out if ok and d[2] == do[2] * do[3] else None


def gqa_fits(core: Core, target: str) -> bool:
    """Whether com.microsoft.GroupQueryAttention computes the (grouped) core: target ort and
    self-attention (T = S: with no cache its keys are the new tokens). Every mask fits: causality
    as its ``causal`` mode, an additive mask as ``attention_bias`` (with causal mode where the core
    has both, as MultiHeadAttention's), and a boolean mask with padding as a bias (causal mode off,
    the causality inside it) whose rows with no allowed key are guarded to the contract's uniform
    row (:func:`.lower_attention.guard_empty_rows`)."""
    dq, dk = core.canonical("q"), core.canonical("kt")
    return target == "ort" and same_dim(dq[-2], dk[-1])


def _group_query_attention(b: Builder, core: Core, q3, k3, v3, allowed, heads: tuple, out_dims) -> ir.Value:
    """GroupQueryAttention on q [B,T,H*d], k / v [B,S=T,Hkv*d] (``heads`` = (H, Hkv)), no cache:
    seqlens_k = S - 1 per row (the last key's index) and total_sequence_length = S, both int32;
    the core's mask as causal mode and / or attention_bias [B|1,H|1,T,S] (see :func:`gqa_fits`)."""
    i32 = ir.DataType.INT32
    parts = core.parts or {}
    causal, bias = int(parts.get("causal", 0)), None
    if core.biases():
        bias = _core_bias(b, core, q3, k3)
    elif allowed is not None or parts.get("kpm") is not None:
        allowed = allowed if allowed is not None else allowed_from_parts(b, parts, q3, k3)
        q3, allowed = guard_empty_rows(b, q3, allowed)
        f = q3.dtype.numpy()
        zero, neg = (b.const(np.array(x, dtype=f), n) for x, n in ((0, "zero"), (max(NEG, np.finfo(f).min), "neg")))
        bias = b.op("Where", [expand_to_logits(b, allowed, q3, k3), zero, neg], dtype=q3.dtype, shape=None)
        causal = 0
    length = b.op("Shape", [k3], {"start": 1, "end": 2}, dtype=ir.DataType.INT64, shape=(1,))
    length = b.op("Cast", [length], {"to": i32}, dtype=i32, shape=(1,))
    last = b.op("Sub", [length, b.const(np.ones(1, np.int32), "one")], dtype=i32, shape=(1,))
    rows = b.op("Shape", [k3], {"start": 0, "end": 1}, dtype=ir.DataType.INT64, shape=(1,))
    seqlens = b.op("Expand", [last, rows], dtype=i32, shape=(out_dims[0],))
    total = b.op("Squeeze", [length], dtype=i32, shape=())
    attrs = {"num_heads": heads[0], "kv_num_heads": heads[1], "scale": float(core.scale), "causal": causal}
    if core.softcap:
        attrs["softcap"] = float(core.softcap)
    inputs = [q3, k3, v3, None, None, seqlens, total] + ([None, None, None, bias] if bias is not None else [])
    return b.op("GroupQueryAttention", inputs, attrs, domain=MS_DOMAIN, dtype=q3.dtype, shape=out_dims)


def _repeat_heads(b: Builder, x3: ir.Value, kv_heads: int, rep: int, head_dim: int) -> ir.Value:
    """[B,S,Hkv*d] -> [B,S,Hkv*rep*d], head h reading head h // rep (repeat_kv / Attention-23's groups)."""
    x5 = b.op("Reshape", [x3, b.ints([0, 0, kv_heads, 1, head_dim])], dtype=x3.dtype, shape=None)
    x5 = b.op("Expand", [x5, b.ints([1, 1, 1, rep, 1])], dtype=x3.dtype, shape=None)
    d = dims(x3)
    shape = None if d is None else (d[0], d[1], kv_heads * rep * head_dim)
    return b.op("Reshape", [x5, b.ints([0, 0, kv_heads * rep * head_dim])], dtype=x3.dtype, shape=shape)


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
    bias = _core_bias(b, core, q3, k3)
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
    # ORT's Attention-23 overflows a finfo.min bias to -inf and zeroes a row that has nothing else,
    # where PyTorch's s + finfo.min is uniform: half of finfo.min keeps such a row uniform, and
    # exp still underflows to 0 for a masked key beside a real one.
    floor = b.const(np.array(np.finfo(q3.dtype.numpy()).min / 2, dtype=q3.dtype.numpy()), "bias_floor")
    bias = b.op("Max", [bias, floor], dtype=bias.dtype, shape=None)
    attrs = {"q_num_heads": heads, "kv_num_heads": heads, "scale": float(core.scale), "is_causal": causal}
    return b.op("Attention", [q3, k3, v3, bias], attrs, dtype=q3.dtype, shape=out_dims)


def check_rewritable(core: Core, target: str) -> None:
    """The checks every rule shares before rewriting (raise NoMatch)."""
    parts, biases = core.parts or {}, core.biases()
    if biases and (parts.get("kpm") is not None or core.allowed is not None):
        raise NoMatch(
            core.anchor, "an additive mask with at most a causal boolean mask", "an additive and a padding mask"
        )
    if biases and parts.get("causal") and target != "ort":
        raise NoMatch(
            core.anchor,
            "on target trt / portable, an additive mask without causality",
            "an additive and a causal mask (ORT's Attention-23 and PyTorch then differ on rows with no allowed key)",
        )
    if any(x.dtype != core.q.dtype for x in biases):
        raise NoMatch(core.anchor, f"additive masks of q's type {core.q.dtype}", str([x.dtype for x in biases]))
    if core.allowed is not None:
        d = dims(core.allowed)
        if d is None or len(d) != 4 or d[1] != 1:
            raise NoMatch(core.anchor, "a boolean mask [B|1, 1, T|1, S] (one for all heads)", str(d))
    if core.softcap and target == "ort" and not gqa_fits(core, target):
        raise NoMatch(
            core.anchor,
            "tanh soft-capping on self-attention (GroupQueryAttention's softcap; MultiHeadAttention has none)",
            f"softcap {core.softcap:g} with queries and keys of different lengths",
        )
    if core.rule == "onnx_attention" and target != "ort":
        raise NoMatch(core.anchor, "target ort (Attention-23 is already the fused form here)", f"target {target}")
    _check_opset(core, target)


def _check_opset(core: Core, target: str) -> None:
    """The ops a rewrite emits exist at the model's opset: Attention-23 on trt / portable; on ort
    the empty-row guard of a padding mask (ReduceMax with its axes as an input: opset 18). A
    TorchScript export (opset 17) keeps such cores as they are (raise NoMatch)."""
    opset = _scope_of(core.anchor.graph).top.opset_imports.get("")
    padding = core.allowed is not None or (core.parts or {}).get("kpm") is not None
    need = 23 if target != "ort" else 18 if padding else 0
    if opset is not None and opset < need:
        what = "ONNX Attention" if target != "ort" else "the empty-row guard of a padding mask"
        raise NoMatch(core.anchor, f"a model at opset >= {need} ({what})", f"opset {opset}")


def match(node: ir.Node, target: str) -> Core:
    """The rule for ``node`` (Softmax or Attention), matched and checked; raises NoMatch."""
    core = match_softmax_core(node) if node.op_type == "Softmax" else match_onnx_attention(node)
    check_rewritable(core, target)
    return core


def fuse_standard_attention(model: ir.Model, target: str, native: bool = False) -> int:
    """Fuse every standard attention core of every scope; returns how many fused."""
    count = 0
    for node in scope_nodes(model):
        if node.graph is None or node.domain != "" or node.op_type not in ("Softmax", "Attention"):
            continue
        try:
            core = match(node, target)
        except NoMatch:
            continue
        rewrite(core, target, native)
        count += 1
    if count:
        if target == "ort":
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        native_attention.attach_function(model)
        ir.passes.common.RemoveUnusedNodesPass()(model)
    return count


def infer_missing_shapes(model: ir.Model) -> bool:
    """ONNX shape inference (weights left out, non-strict) where a Softmax's logits lack known
    dims: torch.onnx's TorchScript exports carry no shapes, and its opset-18 SDPA decomposition
    computes the scale and mask from Shape ops, leaving [?,H,T,?]; the rules check dims. Returns
    whether it ran."""
    unknown = any(
        n.op_type == "Softmax" and n.domain == "" and (dims(n.inputs[0]) is None or None in dims(n.inputs[0]))
        for n in scope_nodes(model)
    )
    if unknown:
        ir.passes.common.ShapeInferencePass(strict_mode=False)(model)
    return unknown


def full_query_axis_masks(model: ir.Model) -> int:
    """Expand every ONNX Attention mask whose query axis is 1 ([B,H|1,1,S]: what torch exports for
    SDPA / nn.MultiheadAttention key padding) to the queries' length: ONNX broadcasts it, but ORT's
    CPU Attention-23 requires the full axis and fails the graph. Returns how many."""
    count = 0
    for node in scope_nodes(model):
        mask = node.inputs[3] if node.op_type == "Attention" and node.domain == "" and len(node.inputs) > 3 else None
        dm, dq = dims(mask), dims(node.inputs[0])
        if dm is None or dq is None or len(dm) < 2 or dm[-2] != 1 or len(dq) not in (3, 4):
            continue
        t_axis = 2 if len(dq) == 4 else 1
        if dq[t_axis] == 1:
            continue
        b = Builder(node, "mask")
        i64 = ir.DataType.INT64
        parts = [b.op("Shape", [node.inputs[0]], {"start": t_axis, "end": t_axis + 1}, dtype=i64, shape=(1,))]
        parts.append(b.op("Shape", [mask], {"start": len(dm) - 1}, dtype=i64, shape=(1,)))
        if len(dm) > 2:
            parts.insert(0, b.op("Shape", [mask], {"start": 0, "end": len(dm) - 2}, dtype=i64, shape=(len(dm) - 2,)))
        shape = b.op("Concat", parts, {"axis": 0}, dtype=i64, shape=(len(dm),))
        full = b.op("Expand", [mask, shape], dtype=mask.dtype, shape=(*dm[:-2], dq[t_axis], dm[-1]))
        node.replace_input_with(3, full)
        count += 1
    return count


class FuseStandardAttentionPass(ir.passes.InPlacePass):
    """Standard attention cores -> fused attention for ``target``, then projection packing."""

    def __init__(self, target: str = "ort", native: bool = True) -> None:
        super().__init__()
        self.target = target
        self.native = native  # StandardAttention where faster (target ort)
        self.counts: dict[str, int] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        infer_missing_shapes(model)
        before = native_attention.count(model)
        fused = fuse_standard_attention(model, self.target, self.native)
        on_native = native_attention.count(model) - before
        packed = pack_projections(model) if fused else 0
        op = "MultiHeadAttention" if self.target == "ort" else "Attention"
        self.counts = {f"{op} (standard)": fused - on_native, "packed MatMul": packed}
        if on_native:
            self.counts[f"{native_attention.OP} (standard)"] = on_native
        if self.target != "ort":
            self.counts["Attention mask expanded"] = full_query_axis_masks(model)
        return ir.passes.PassResult(model, bool(fused or self.counts.get("Attention mask expanded")))
