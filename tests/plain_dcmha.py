"""DCMHA written in plain PyTorch, the way people write it in the wild (never imports attn2onnx).

These modules are the *input* of the DCMHA fusion passes: exported with the stock
``torch.onnx.export`` they give graphs made of standard ops only, which
``attn2onnx.passes.fuse_dcmha`` must turn into ``ai.attn2onnx`` DcmhaCompose / DcmhaAttention
nodes without changing the outputs. Three independent styles of the same math (variants.md §5):

* :class:`DcformerStyle` -- the authors' reference code: einsums for the dynamic weights and a
  Python loop over the rank in the compose, each step a broadcast multiply and a sum over heads;
  static head mix by ``einsum('BNTS,NM->BMTS')``; ``masked_fill`` with ``finfo.min``.
* :class:`RankEinsumStyle` -- one einsum per side over the rank axis, gates by broadcasting,
  factors from one matmul against the flattened ``dw1``, ``torch.where`` with -1e30.
* :class:`MergedMatrixStyle` -- per-position merged N x N matrices ``U^T V + diag(g) (+ Wb)``
  applied by batched MatMul on permuted logits.

They share one parameter layout (:class:`PlainDcmhaBase`) so tests can copy weights across and
check that the three agree. Near misses (:class:`WrongAxisCompose`, :class:`MaskBeforeCompose`,
:class:`BroadcastHeadCompose`) look like DCMHA but are not: the passes must leave them alone
(or at least never claim the whole attention core for them).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

NEG = -1e30


class PlainDcmhaBase(nn.Module):
    """Parameters of one DCMHA layer (variants.md §5), layout shared by every style.

    dw1 [D, 4, K], qkw [4, K, 2R, N], dd [D, 4N], static mix wb [2, N, N] (pre, post).
    Slots c: 0 pre/query, 1 pre/key, 2 post/query, 3 post/key.
    """

    def __init__(
        self,
        d_model: int = 32,
        n_heads: int = 4,
        rank: int = 2,
        causal: bool = False,
        static_mix: bool = False,
        bias: bool = False,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        self.d_model, self.n_heads, self.rank = d_model, n_heads, rank
        self.head_dim = d_model // n_heads
        self.causal, self.use_static_mix = causal, static_mix
        n, k = n_heads, 4 * n_heads
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.o_proj = nn.Linear(d_model, d_model, bias=bias)

        def rnd(*shape: int, std: float) -> nn.Parameter:
            return nn.Parameter(torch.randn(*shape, generator=gen) * std)

        self.dw1 = rnd(d_model, 4, k, std=1.0 / math.sqrt(d_model))
        self.qkw = rnd(4, k, 2 * rank, n, std=1.0 / math.sqrt(k))
        self.dd = rnd(d_model, 4 * n, std=1.0 / math.sqrt(d_model))
        self.wb = rnd(2, n, n, std=0.3) if static_mix else None
        if gen is not None:
            with torch.no_grad():
                for lin in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
                    lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) / math.sqrt(d_model))
                    if lin.bias is not None:
                        lin.bias.copy_(torch.randn(lin.bias.shape, generator=gen) * 0.1)

    # -- shared pieces -------------------------------------------------------------------------
    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as [B, N, T, d]."""
        b, t, _ = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)

        return split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))

    def allowed(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Boolean [B|1, 1, T, S] of allowed (t, s) pairs, None when everything is allowed."""
        t = x.shape[1]
        allowed = None
        if self.causal:
            allowed = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()[None, None]
        if key_padding_mask is not None:
            kpm = key_padding_mask[:, None, None, :]
            allowed = kpm if allowed is None else allowed & kpm
        return allowed

    def out(self, o: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(b, t, self.d_model))


# ---------------------------------------------------------------------------------------------
# (a) DCFormer style: einsum factors, compose as a loop over the rank
# ---------------------------------------------------------------------------------------------
class DcformerStyle(PlainDcmhaBase):
    """The authors' formulation (DCFormer ``_cross_head_proj`` with ``loop_over_dynamic_hd``)."""

    def dynamic_weights(self, x: torch.Tensor):
        hidden = F.gelu(torch.einsum("BTD,DCK->BTCK", x, self.dw1))
        w1, w2 = torch.split(torch.einsum("BTCK,CKIM->BTCIM", hidden, self.qkw), self.rank, dim=-2)
        w1 = w1 * torch.rsqrt(w1.pow(2).mean(-1, keepdim=True) + 1e-6)
        qw1, kw1, pqw1, pkw1 = torch.unbind(w1, dim=2)  # each [B, T, R, N]
        qw2, kw2, pqw2, pkw2 = torch.unbind(w2, dim=2)
        dd = torch.tanh(torch.einsum("BTD,DM->BTM", x, self.dd))
        qdd, kdd, pqdd, pkdd = torch.split(dd, self.n_heads, dim=-1)  # each [B, T, N]
        return (qw1, qw2, kw1, kw2, qdd, kdd), (pqw1, pqw2, pkw1, pkw2, pqdd, pkdd)

    def cross_head_proj(self, inputs, sw, qw1, qw2, kw1, kw2, qdd, kdd):
        out = inputs + torch.einsum("BNTS,NM->BMTS", inputs, sw) if sw is not None else inputs
        for i in range(qw1.shape[-2]):
            qhidden = (inputs * qw1[..., i, :].transpose(-2, -1).unsqueeze(-1)).sum(1)  # BTS
            qout = qhidden.unsqueeze(1) * qw2[..., i, :].transpose(-2, -1).unsqueeze(-1)
            out = out + qout
            khidden = (inputs * kw1[..., i, :].transpose(-2, -1).unsqueeze(-2)).sum(1)
            kout = khidden.unsqueeze(1) * kw2[..., i, :].transpose(-2, -1).unsqueeze(-2)
            out = out + kout
        out = out + inputs * qdd.transpose(-2, -1).unsqueeze(-1)
        out = out + inputs * kdd.transpose(-2, -1).unsqueeze(-2)
        return out

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.heads(x)
        pre, post = self.dynamic_weights(x)
        logits = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        logits = self.cross_head_proj(logits, None if self.wb is None else self.wb[0], *pre)
        allowed = self.allowed(x, key_padding_mask)
        if allowed is not None:
            logits = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
        probs = logits.float().softmax(dim=-1).type_as(q)
        probs = self.cross_head_proj(probs, None if self.wb is None else self.wb[1], *post)
        return self.out(torch.matmul(probs, v))


# ---------------------------------------------------------------------------------------------
# (b) one einsum per side over the rank axis
# ---------------------------------------------------------------------------------------------
class RankEinsumStyle(PlainDcmhaBase):
    """Rank axis kept inside the einsums; factors from one matmul against flattened dw1."""

    def factors(self, x: torch.Tensor):
        b, t, _ = x.shape
        n, r = self.n_heads, self.rank
        h = F.gelu(x @ self.dw1.flatten(1)).view(b, t, 4, -1)  # [B,T,4,K]
        z = torch.einsum("btck,ckrn->btcrn", h, self.qkw)  # [B,T,4,2R,N]
        u, w = z[:, :, :, :r], z[:, :, :, r:]
        u = u / torch.sqrt(torch.mean(u * u, dim=-1, keepdim=True) + 1e-6)
        g = torch.tanh(x @ self.dd).view(b, t, 4, n)
        return u, w, g

    @staticmethod
    def compose(a, uq, vq, uk, vk, gq, gk, wb):
        """a [B,N,T,S]; u*, v* [B,T|S,R,N]; g* [B,T|S,N]."""
        out = a + torch.einsum("btsr,btrn->bnts", torch.einsum("bnts,btrn->btsr", a, uq), vq)
        out = out + torch.einsum("btsr,bsrn->bnts", torch.einsum("bnts,bsrn->btsr", a, uk), vk)
        out = out + a * gq.permute(0, 2, 1)[:, :, :, None] + a * gk.permute(0, 2, 1)[:, :, None, :]
        if wb is not None:
            out = out + torch.einsum("bnts,nm->bmts", a, wb)
        return out

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.heads(x)
        u, w, g = self.factors(x)
        wb = (None, None) if self.wb is None else (self.wb[0], self.wb[1])
        logits = torch.einsum("bntd,bnsd->bnts", q, k) * self.head_dim**-0.5
        logits = self.compose(logits, u[:, :, 0], w[:, :, 0], u[:, :, 1], w[:, :, 1], g[:, :, 0], g[:, :, 1], wb[0])
        allowed = self.allowed(x, key_padding_mask)
        if allowed is not None:
            logits = torch.where(allowed, logits, NEG)
        probs = torch.softmax(logits, dim=-1)
        probs = self.compose(probs, u[:, :, 2], w[:, :, 2], u[:, :, 3], w[:, :, 3], g[:, :, 2], g[:, :, 3], wb[1])
        return self.out(probs @ v)


# ---------------------------------------------------------------------------------------------
# (c) merged per-position N x N matrices applied by batched MatMul
# ---------------------------------------------------------------------------------------------
class MergedMatrixStyle(PlainDcmhaBase):
    """M_t = U_t^T V_t + diag(g_t) (+ Wb on the query side), applied as [.., S, N] @ [N, N]."""

    def factors(self, x: torch.Tensor):
        b, t, _ = x.shape
        n, r = self.n_heads, self.rank
        h = F.gelu(torch.matmul(x[:, :, None, None, :], self.dw1.permute(1, 0, 2)))  # [B,T,4,1,K]
        z = torch.matmul(h, self.qkw.flatten(2)).view(b, t, 4, 2 * r, n)  # [B,T,4,2R,N]
        u, w = z.split(r, dim=3)
        u = u * torch.rsqrt(u.square().mean(dim=-1, keepdim=True) + 1e-6)
        g = torch.tanh(F.linear(x, self.dd.t())).unflatten(-1, (4, n))
        eye = torch.eye(n, dtype=x.dtype, device=x.device)
        merged = u.transpose(-1, -2) @ w + g.unsqueeze(-1) * eye  # [B,T,4,N,N]
        return merged

    def compose(self, a, mq, mk, wb):
        """a [B,N,T,S]; mq [B,T,N,N]; mk [B,S,N,N]."""
        if wb is not None:
            mq = mq + wb
        by_query = torch.matmul(a.permute(0, 2, 3, 1), mq).permute(0, 3, 1, 2)
        by_key = torch.matmul(a.permute(0, 3, 2, 1), mk).permute(0, 3, 2, 1)
        return a + by_query + by_key

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.heads(x)
        m = self.factors(x)
        wb = (None, None) if self.wb is None else (self.wb[0], self.wb[1])
        logits = torch.matmul(q * self.head_dim**-0.5, k.transpose(2, 3))
        logits = self.compose(logits, m[:, :, 0], m[:, :, 1], wb[0])
        allowed = self.allowed(x, key_padding_mask)
        if allowed is not None:
            logits = logits.masked_fill(allowed.logical_not(), NEG)
        probs = F.softmax(logits, dim=-1)
        probs = self.compose(probs, m[:, :, 2], m[:, :, 3], wb[1])
        return self.out(torch.matmul(probs, v))


STYLES = {"dcformer": DcformerStyle, "rank_einsum": RankEinsumStyle, "merged": MergedMatrixStyle}


# ---------------------------------------------------------------------------------------------
# near misses: look like DCMHA, are not
# ---------------------------------------------------------------------------------------------
class WrongAxisCompose(DcformerStyle):
    """Query-side rank terms sum over the *query* axis instead of the heads: they mix positions
    (and leak the future), which is not a compose."""

    def cross_head_proj(self, inputs, sw, qw1, qw2, kw1, kw2, qdd, kdd):
        out = inputs
        for i in range(qw1.shape[-2]):
            qhidden = (inputs * qw1[..., i, :].transpose(-2, -1).unsqueeze(-1)).sum(2)  # B N S
            out = out + qhidden.unsqueeze(2) * qw2[..., i, :].transpose(-2, -1).unsqueeze(-1)
            khidden = (inputs * kw1[..., i, :].transpose(-2, -1).unsqueeze(-2)).sum(1)
            out = out + khidden.unsqueeze(1) * kw2[..., i, :].transpose(-2, -1).unsqueeze(-2)
        out = out + inputs * qdd.transpose(-2, -1).unsqueeze(-1)
        return out + inputs * kdd.transpose(-2, -1).unsqueeze(-2)


class MaskBeforeCompose(DcformerStyle):
    """Masks the logits *before* the pre-compose (variants.md: never do this). The compose steps
    are still exact composes, but the whole core is not DcmhaAttention."""

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.heads(x)
        pre, post = self.dynamic_weights(x)
        logits = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        allowed = self.allowed(x, key_padding_mask)
        if allowed is not None:
            logits = logits.masked_fill(~allowed, -1e4)
        logits = self.cross_head_proj(logits, None, *pre)
        probs = logits.softmax(dim=-1)
        probs = self.cross_head_proj(probs, None, *post)
        return self.out(torch.matmul(probs, v))


class BroadcastHeadCompose(DcformerStyle):
    """Factors carry one 'head' broadcast over all N heads (a different head count): the rank
    terms add the same value to every head, which DcmhaCompose (N-head factors) does not express
    without changing the factor layout."""

    def cross_head_proj(self, inputs, sw, qw1, qw2, kw1, kw2, qdd, kdd):
        out = inputs
        for i in range(qw1.shape[-2]):
            qhidden = (inputs * qw1[..., i, :].transpose(-2, -1).unsqueeze(-1)).sum(1)
            out = out + qhidden.unsqueeze(1) * qw2[..., i, :1].transpose(-2, -1).unsqueeze(-1)
            khidden = (inputs * kw1[..., i, :].transpose(-2, -1).unsqueeze(-2)).sum(1)
            out = out + khidden.unsqueeze(1) * kw2[..., i, :1].transpose(-2, -1).unsqueeze(-2)
        return out


NEAR_MISSES = {"wrong_axis": WrongAxisCompose, "mask_before": MaskBeforeCompose, "broadcast_head": BroadcastHeadCompose}


def copy_params(dst: PlainDcmhaBase, src: PlainDcmhaBase) -> PlainDcmhaBase:
    """Load ``src``'s weights into ``dst`` (same layout for every style)."""
    dst.load_state_dict(src.state_dict())
    return dst


def reference_dcmha(m: PlainDcmhaBase, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Direct transcription of variants.md §5 (explicit per-(t,s) head-vector maths) in float64,
    independent of the three styles: the oracle they are checked against."""
    dt = torch.float64
    x = x.to(dt)
    b, t, _ = x.shape
    n, r, d = m.n_heads, m.rank, m.head_dim
    W = lambda lin: (lin.weight.to(dt), None if lin.bias is None else lin.bias.to(dt))  # noqa: E731

    def lin(l, y):
        w, bias = W(l)
        return y @ w.t() + (0 if bias is None else bias)

    q = lin(m.q_proj, x).view(b, t, n, d)
    k = lin(m.k_proj, x).view(b, t, n, d)
    v = lin(m.v_proj, x).view(b, t, n, d)
    hid = F.gelu(torch.einsum("btd,dck->btck", x, m.dw1.to(dt)))
    z = torch.einsum("btck,ckrn->btcrn", hid, m.qkw.to(dt))
    u, vv = z[:, :, :, :r], z[:, :, :, r:]
    u = u / torch.sqrt((u**2).mean(-1, keepdim=True) + 1e-6)
    g = torch.tanh(x @ m.dd.to(dt)).view(b, t, 4, n)

    def compose(a, cq, ck, wb):
        aa = a.permute(0, 2, 3, 1)  # [B,T,S,N]
        out = aa.clone()
        out = out + torch.einsum("btsr,btrn->btsn", torch.einsum("btsn,btrn->btsr", aa, u[:, :, cq]), vv[:, :, cq])
        out = out + torch.einsum("btsr,bsrn->btsn", torch.einsum("btsn,bsrn->btsr", aa, u[:, :, ck]), vv[:, :, ck])
        out = out + aa * g[:, :, cq][:, :, None, :] + aa * g[:, :, ck][:, None, :, :]
        if wb is not None:
            out = out + aa @ wb.to(dt)
        return out.permute(0, 3, 1, 2)

    logits = torch.einsum("btnd,bsnd->bnts", q, k) / math.sqrt(d)
    logits = compose(logits, 0, 1, None if m.wb is None else m.wb[0])
    allowed = torch.ones(b, 1, t, t, dtype=torch.bool)
    if m.causal:
        allowed = allowed & torch.ones(t, t, dtype=torch.bool).tril()
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    logits = torch.where(allowed, logits, torch.tensor(NEG, dtype=dt))
    probs = logits.softmax(-1)
    probs = compose(probs, 2, 3, None if m.wb is None else m.wb[1])
    o = torch.einsum("bnts,bsnd->btnd", probs, v).reshape(b, t, n * d)
    return lin(m.o_proj, o)


# ---------------------------------------------------------------------------------------------
# stock export and ORT helpers (the stock path: no attn2onnx anywhere)
# ---------------------------------------------------------------------------------------------
def export_stock(module: nn.Module, d_model: int, path: str, with_mask: bool = True) -> str:
    """``torch.onnx.export(dynamo=True)``, opset 23, dynamic batch and sequence."""
    import contextlib
    import io
    import warnings

    from torch.export import Dim

    module = module.eval()
    x = torch.randn(2, 8, d_model)
    batch, seq = Dim("batch"), Dim("seq")
    args, names, dyn = (x,), ["x"], {"x": {0: batch, 1: seq}}
    if with_mask:
        args += (torch.ones(2, 8, dtype=torch.bool),)
        names.append("key_padding_mask")
        dyn["key_padding_mask"] = {0: batch, 1: seq}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            opset_version=23,
            input_names=names,
            output_names=["y"],
            dynamic_shapes=dyn,
            verbose=False,
        )
    program.save(path)
    return path


def run_ort(model, feeds: dict, threads: int = 1):
    """Run an ONNX model (path or ModelProto) on ORT's CPU provider; first output."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    source = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def random_feeds(batch: int, seq: int, d_model: int, seed: int = 0, pad: int = 2, with_mask: bool = True) -> dict:
    """x and a right-padded key_padding_mask (the last row loses ``pad`` tokens)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    feeds = {"x": rng.standard_normal((batch, seq, d_model)).astype(np.float32)}
    if with_mask:
        mask = np.ones((batch, seq), dtype=bool)
        mask[-1, seq - min(pad, seq - 1) :] = False
        feeds["key_padding_mask"] = mask
    return feeds
