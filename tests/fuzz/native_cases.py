"""Hostile and edge-case runs of the DcmhaAttention C++ kernel in a plain ONNX Runtime session.

The kernel library must never crash the process that loads it: every case either runs (the
output has the contract's shape) or ends in an ONNX Runtime error (at load or at run), never in
a signal, a hang or a sanitizer report. Cases by kind: empty or missing input / output names,
wrong ranks, dtypes and shapes, zero sizes, T > S and S > T on both kernel paths (direct T <= 8,
blocked T > 8), huge and ill-typed attributes, every attn_mask form, bool bytes other than 0/1.

This file runs as a script, ``python -m fuzz.native_cases LIBRARY [CASE ...]`` from tests/, and
needs only numpy, onnx and onnxruntime (no torch: it also runs with the sanitizer runtime
preloaded, tests/test_native_sanitized.py). Each case runs in a forked child with its stderr in
its own file, so a signal or a sanitizer report names its case and the other cases still run;
one JSON line per case goes to stdout. :func:`run_cases` starts the script and reads them back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnxruntime as ort  # imported once, before the forks: each case's child inherits it
from onnx import TensorProto, helper

from .harness import _wait

INPUTS = ("q", "k", "v", "q_factors", "k_factors", "key_padding_mask", "static_mix", "attn_mask")
BOOL_INPUTS = ("key_padding_mask", "attn_mask")
INT64_MAX = 2**63 - 1
CASE_TIMEOUT_S = 120.0
# What a sanitizer prints when it finds something (ASan, UBSan, LeakSanitizer).
SANITIZER_MARKERS = ("AddressSanitizer", "UndefinedBehaviorSanitizer", "LeakSanitizer", "runtime error:")


@dataclass(frozen=True)
class Case:
    """One DcmhaAttention node in a fresh model: the node's input names (``""`` = written empty),
    each fed input's shape and element type, attributes, and what must happen."""

    kind: str
    name: str
    args: tuple[str, ...]
    shapes: dict[str, tuple[int, ...]]
    attrs: dict = field(default_factory=dict)
    # "ok": runs, output of out_shape; "error": an ORT error at load, or the kernel's INVALID_ARGUMENT at run
    expect: str = "ok"
    out_shape: tuple[int, ...] | None = None
    elem: int = TensorProto.FLOAT  # the node's float type (inputs are cast to it when not FLOAT)
    types: dict[str, int] = field(default_factory=dict)  # graph inputs of another type than the default
    raw_bool: dict[str, int] = field(default_factory=dict)  # bool input -> a byte other than 0/1 in it
    outputs: tuple[str, ...] = ("o",)
    op: str = "DcmhaAttention"  # the node's op (tests/fuzz/standard_cases.py: StandardAttention)

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.name}"


def shapes_of(b: int, t: int, s: int, n: int, d: int, r: int = 1, dv: int | None = None) -> dict:
    """The seven required inputs' shapes of a well-formed call."""
    f = 2 * r + 1
    return {
        "q": (b, t, n, d),
        "k": (b, s, n, d),
        "v": (b, s, n, d if dv is None else dv),
        "q_factors": (b, t, 2, f, n),
        "k_factors": (b, s, 2, f, n),
        "key_padding_mask": (b, s),
        "static_mix": (2, n, n),
    }


def valid(kind: str, name: str, b=1, t=5, s=7, n=2, d=4, r=1, dv=None, mask=None, **attrs) -> Case:
    """A well-formed call (``mask``: the attn_mask shape, None = no 8th input)."""
    shapes = shapes_of(b, t, s, n, d, r, dv)
    args = INPUTS[:7]
    if mask is not None:
        shapes["attn_mask"] = tuple(mask)
        args = INPUTS
    return Case(kind, name, args, shapes, attrs, "ok", (b, t, n, d if dv is None else dv))


def refused(case: Case, kind: str, name: str, **changes) -> Case:
    """``case`` with ``changes`` (Case fields): must end in an ORT error."""
    return replace(case, kind=kind, name=name, expect="error", out_shape=None, **changes)


def bad(case: Case, kind: str, name: str, **shapes) -> Case:
    """``case`` with some inputs reshaped: must be refused."""
    return refused(case, kind, name, shapes={**case.shapes, **shapes})


def emptied(base: Case, index: int) -> Case:
    """``base`` with input ``index`` written as "": refused, unless it is the optional attn_mask."""
    args = list(base.args)
    gone, args[index] = args[index], ""
    shapes = {k: v for k, v in base.shapes.items() if k != gone}
    if gone == "attn_mask":
        return replace(base, kind="empty-name", name=gone, args=tuple(args), shapes=shapes)
    return refused(base, "empty-name", gone, args=tuple(args), shapes=shapes)


def cases() -> list[Case]:
    """Every case, in a fixed order (names unique within a kind)."""
    out: list[Case] = []
    base = valid("base", "direct", t=3)
    blocked = valid("base", "blocked", t=12, s=12)
    masked = valid("base", "mask", t=3, mask=(3, 7))
    out += [base, blocked, masked]

    # Inputs written as "" (ONNX's "absent") or left off the end of the node.
    out += [emptied(masked, index) for index in range(8)]
    out.append(replace(emptied(blocked, 6), name="static_mix/blocked"))
    out.append(replace(emptied(masked, 7), name="attn_mask/causal", attrs={"causal": 1, "window": 2}))
    out.append(refused(masked, "empty-name", "all", args=("",) * 8, shapes={}))
    out.append(refused(base, "empty-name", "output", outputs=("",)))
    for count in (0, 1, 6):
        args = base.args[:count]
        shapes = {k: v for k, v in base.shapes.items() if k in args}
        out.append(refused(base, "missing", f"{count}-inputs", args=args, shapes=shapes))
    out.append(refused(masked, "missing", "9-inputs", args=(*INPUTS, "q")))
    out.append(refused(base, "missing", "2-outputs", outputs=("o", "o2")))

    # Wrong ranks.
    rank = {
        "q": (1, 3, 2),
        "k": (1, 7, 2, 4, 1),
        "v": (7, 2, 4),
        "q_factors": (1, 3, 3, 2),
        "k_factors": (1, 7, 2, 3, 2, 1),
        "key_padding_mask": (7,),
        "static_mix": (2, 4),
    }
    for name, shape in rank.items():
        out.append(bad(base, "rank", name, **{name: shape}))
    for shape in [(), (7,), (1, 3, 7), (1, 1, 1, 3, 7)]:
        out.append(bad(masked, "rank", f"attn_mask-{len(shape)}", attn_mask=shape))

    # Wrong element types: refused by ORT's type check at load.
    for name, elem in [
        ("q", TensorProto.DOUBLE),
        ("k", TensorProto.INT64),
        ("static_mix", TensorProto.FLOAT16),
        ("key_padding_mask", TensorProto.FLOAT),
        ("attn_mask", TensorProto.UINT8),
    ]:
        out.append(refused(masked, "dtype", name, types={name: elem}))
    for elem, label in [(TensorProto.FLOAT16, "float16"), (TensorProto.BFLOAT16, "bfloat16")]:
        out.append(replace(masked, kind="dtype", name=f"{label}-ok", elem=elem))
        out.append(replace(valid("dtype", f"{label}-blocked", t=11, s=9, causal=1), elem=elem))

    # Shapes that disagree.
    for case, suffix in [(base, ""), (blocked, "/blocked")]:
        sh = case.shapes
        b, t, n = sh["q"][:3]
        s = sh["k"][1]
        out += [
            bad(case, "shape", "k-batch" + suffix, k=(b + 1, s, n, 4)),
            bad(case, "shape", "k-heads" + suffix, k=(b, s, n + 1, 4)),
            bad(case, "shape", "k-dim" + suffix, k=(b, s, n, 5)),
            bad(case, "shape", "v-length" + suffix, v=(b, s + 1, n, 4)),
            bad(case, "shape", "q_factors-even-F" + suffix, q_factors=(b, t, 2, 4, n)),
            bad(case, "shape", "q_factors-slots" + suffix, q_factors=(b, t, 3, 3, n)),
            bad(case, "shape", "k_factors-F" + suffix, k_factors=(b, s, 2, 5, n)),
            bad(case, "shape", "key_padding_mask" + suffix, key_padding_mask=(b, s + 1)),
            bad(case, "shape", "static_mix" + suffix, static_mix=(2, n, n + 1)),
        ]
    r17 = 35  # F = 2R+1 with R = 17 > the kernel's 16
    out.append(bad(base, "shape", "rank-R-17", q_factors=(1, 3, 2, r17, 2), k_factors=(1, 7, 2, r17, 2)))
    for shape in [(4, 7), (3, 8), (2, 2, 3, 7), (1, 3, 3, 7), (1, 2, 3, 6), (1, 2, 2, 7)]:
        label = "x".join(map(str, shape))
        out.append(bad(masked, "shape", f"attn_mask-{label}", attn_mask=shape))

    # Zero sizes, with and without attn_mask, on both paths.
    for label, dims in [
        ("B0", dict(b=0)),
        ("T0", dict(t=0)),
        ("S0", dict(s=0)),
        ("N0", dict(n=0)),
        ("d0", dict(d=0)),
        ("dv0", dict(dv=0)),
        ("S0-blocked", dict(t=12, s=0)),
        ("T0-S0", dict(t=0, s=0)),
    ]:
        out.append(valid("zero", label, **dims))
        t, s = dims.get("t", 5), dims.get("s", 7)
        out.append(valid("zero", label + "/mask", mask=(t, s), causal=1, **dims))
    out.append(valid("zero", "R0", r=0, causal=1))

    # Sequence lengths: T > S (rows that see no key) and S > T, both paths, with windows.
    for t, s in [(6, 3), (20, 5), (3, 40), (12, 300), (1, 1), (9, 1)]:
        out.append(valid("length", f"T{t}-S{s}", t=t, s=s, causal=1))
        out.append(valid("length", f"T{t}-S{s}-window2", t=t, s=s, causal=1, window=2, use_static_mix=1))
        out.append(valid("length", f"T{t}-S{s}-mask", t=t, s=s, mask=(1, 2, t, s), causal=1, window=3))

    # Attributes: huge, negative, ill-typed.
    for t, s in [(3, 7), (20, 5), (6, 3)]:
        out.append(valid("attribute", f"window-max-T{t}-S{s}", t=t, s=s, causal=1, window=INT64_MAX))
        out.append(valid("attribute", f"window-max-T{t}-S{s}-mask", t=t, s=s, mask=(t, s), causal=1, window=INT64_MAX))
    out += [
        refused(base, "attribute", "window-min", attrs={"causal": 1, "window": -(2**63)}),
        refused(base, "attribute", "window-negative", attrs={"causal": 1, "window": -1}),
        refused(base, "attribute", "window-not-causal", attrs={"window": 3}),
        valid("attribute", "causal-min", causal=-(2**63)),
        valid("attribute", "static-mix-max", use_static_mix=INT64_MAX),
        valid("attribute", "scale-huge", scale=3.0e38),
        valid("attribute", "scale-negative", scale=-2.5),
        valid("attribute", "scale-nan", scale=float("nan")),
        valid("attribute", "scale-inf", scale=float("inf")),
        refused(base, "attribute", "window-float", attrs={"causal": 1, "window": 2.5}),
        refused(base, "attribute", "scale-int", attrs={"scale": 3}),
        refused(base, "attribute", "causal-list", attrs={"causal": [1, 1]}),
        valid("attribute", "unknown", colour="blue"),
    ]

    # attn_mask in each accepted form, with rows and heads that see nothing, both paths.
    for t, s in [(4, 9), (14, 30)]:
        for shape in [(t, s), (1, 1, t, s), (2, 1, t, s), (1, 3, t, s), (2, 3, t, s), (2, 1, 1, s), (1, 1, 1, 1)]:
            label = "x".join(map(str, shape))
            out.append(valid("attn_mask", f"T{t}-{label}", b=2, t=t, s=s, n=3, mask=shape, use_static_mix=1))
        out.append(valid("attn_mask", f"T{t}-causal-window", b=2, t=t, s=s, n=3, mask=(2, 3, t, s), causal=1, window=2))

    # Values: bool bytes other than 0 / 1 (an initializer's raw data), NaN / inf inputs.
    out += [
        replace(valid("value", "key_padding_mask-byte-2"), raw_bool={"key_padding_mask": 2}),
        replace(valid("value", "key_padding_mask-byte-255", t=12, s=12), raw_bool={"key_padding_mask": 255}),
        replace(valid("value", "attn_mask-byte-7", mask=(5, 7)), raw_bool={"attn_mask": 7}),
        valid("value", "nan-inf", causal=1),
    ]
    return out


# ----------------------------------------------------------------------------- one case
def _feeds(case: Case, rng: np.random.Generator) -> dict[str, np.ndarray]:
    feeds = {}
    for name, shape in case.shapes.items():
        elem = case.types.get(name, TensorProto.BOOL if name in BOOL_INPUTS else TensorProto.FLOAT)
        dtype = helper.tensor_dtype_to_np_dtype(elem)
        if elem == TensorProto.BOOL:
            feeds[name] = np.asarray(rng.random(shape) < 0.7)
        else:
            feeds[name] = (0.5 * rng.standard_normal(shape)).astype(dtype)
    if case.name == "nan-inf":
        feeds["q"].flat[0], feeds["k"].flat[1] = np.nan, np.inf
    return feeds


def model_bytes(case: Case, feeds: dict[str, np.ndarray]) -> bytes:
    """The one-node model of ``case``: graph inputs for its feeds (initializers for ``raw_bool``),
    Cast nodes around the node when its type is not float."""
    inputs, inits, nodes = [], [], []
    for name, value in feeds.items():
        if name in case.raw_bool:
            raw = np.where(value, case.raw_bool[name], 0).astype(np.uint8)
            inits.append(helper.make_tensor(name, TensorProto.BOOL, value.shape, raw.tobytes(), raw=True))
        else:
            elem = helper.np_dtype_to_tensor_dtype(value.dtype)
            inputs.append(helper.make_tensor_value_info(name, elem, value.shape))
    args = list(case.args)
    if case.elem != TensorProto.FLOAT:
        for i, name in enumerate(args):
            if name and name not in BOOL_INPUTS:
                args[i] = f"{name}_cast"
                nodes.append(helper.make_node("Cast", [name], [args[i]], to=case.elem))
    outs = list(case.outputs)
    if case.elem != TensorProto.FLOAT and outs[0]:
        outs[0] = "o_cast"
    nodes.append(helper.make_node(case.op, args, outs, domain="ai.attn2onnx", **case.attrs))
    if outs[0] == "o_cast":
        nodes.append(helper.make_node("Cast", ["o_cast"], ["o"], to=TensorProto.FLOAT))
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in case.outputs if name]
    if not outputs:  # a graph needs an output: one that does not depend on the node
        nodes.append(helper.make_node("Identity", ["q"], ["q_copy"]))
        outputs = [helper.make_tensor_value_info("q_copy", TensorProto.FLOAT, None)]
    graph = helper.make_graph(nodes, case.id, inputs, outputs, initializer=inits)
    opsets = [helper.make_opsetid("", 23), helper.make_opsetid("ai.attn2onnx", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10).SerializeToString()


def run_case(case: Case, library: str) -> dict:
    """Load and run ``case`` in this process: {"outcome": "ok" | "load-error" | "run-error", ...}."""
    feeds = _feeds(case, np.random.default_rng(len(case.id)))
    options = ort.SessionOptions()
    options.register_custom_ops_library(library)
    options.intra_op_num_threads = 2
    try:
        session = ort.InferenceSession(model_bytes(case, feeds), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - any ORT error is the outcome being recorded
        return {"outcome": "load-error", "error": type(exc).__name__, "detail": str(exc)[-400:]}
    fed = {name: value for name, value in feeds.items() if name not in case.raw_bool}
    try:
        result = session.run(None, fed)[0]
    except Exception as exc:  # noqa: BLE001
        return {"outcome": "run-error", "error": type(exc).__name__, "detail": str(exc)[-400:]}
    return {"outcome": "ok", "shape": list(result.shape)}


def run_forked(case: Case, library: str, timeout: float = CASE_TIMEOUT_S) -> dict:
    """``run_case`` in a forked child (stderr to a file of its own): adds "signal", "status",
    "timed_out" and "stderr" (its start) to what the child reported."""
    with tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as report:
        pid = os.fork()
        if pid == 0:  # the child: never returns
            status = 0
            try:
                os.setpgid(0, 0)
                os.dup2(err.fileno(), 2)
                report.write(json.dumps(run_case(case, library)).encode())
                report.flush()
            except BaseException:  # noqa: BLE001 - recorded as the child's exit status
                status = 3
            os._exit(status)
        wait_status, timed_out = _wait(pid, time.monotonic() + timeout)
        report.seek(0)
        err.seek(0)
        body = report.read()
        result = json.loads(body) if body else {"outcome": "none"}
        result["stderr"] = err.read().decode(errors="replace")[:4000]  # a sanitizer's headline comes first
    result["timed_out"] = timed_out
    result["signal"] = os.WTERMSIG(wait_status) if not timed_out and os.WIFSIGNALED(wait_status) else None
    result["status"] = os.WEXITSTATUS(wait_status) if os.WIFEXITED(wait_status) else None
    return result


def problems(case: Case, result: dict) -> list[str]:
    """Every way ``result`` breaks what ``case`` expects (empty: as expected)."""
    found = []
    if result["timed_out"]:
        found.append("hang: still running at the timeout")
    if result["signal"] is not None:
        found.append(f"crash: killed by signal {result['signal']}")
    if result["status"] not in (0, None):
        found.append(f"child exit status {result['status']}")
    if any(marker in result["stderr"] for marker in SANITIZER_MARKERS):
        found.append("sanitizer report:\n" + result["stderr"])
    if case.expect == "ok":
        if result["outcome"] != "ok":
            found.append(f"expected a run, got {result['outcome']}: {result.get('detail', '')}")
        elif tuple(result["shape"]) != case.out_shape:
            found.append(f"output shape {result['shape']}, expected {list(case.out_shape)}")
    elif result["outcome"] == "run-error" and result["error"] != "InvalidArgument":
        found.append(f"the kernel's refusal must be INVALID_ARGUMENT, got {result['error']}: {result['detail']}")
    elif result["outcome"] not in ("load-error", "run-error"):
        found.append(f"expected an ORT error, got {result['outcome']}")
    return found


def failures(results: dict[str, dict], all_cases: list[Case] | None = None) -> dict[str, list[str]]:
    """Case id -> its problems, for every case (of ``all_cases``, default this file's) that broke
    its expectation or never reported."""
    broken = {}
    for case in cases() if all_cases is None else all_cases:
        result = results.get(case.id)
        found = problems(case, result) if result else ["no result: the case runner died first"]
        if found:
            broken[case.id] = found
    return broken


def run_cases(
    library: Path, env: dict[str, str] | None = None, timeout: float = 900.0, module: str = "fuzz.native_cases"
) -> dict[str, dict]:
    """Run every case (``module``, this file or another with its own cases, as a script in a child
    process with ``env``) against ``library``: case id -> result. A missing case in the answer means
    the script itself died."""
    proc = subprocess.run(
        [sys.executable, "-m", module, str(library)],
        cwd=Path(__file__).parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            results[entry.pop("id")] = entry
    if not results:
        raise RuntimeError(f"native_cases printed no result (exit {proc.returncode}): {proc.stderr[-3000:]}")
    return results


def main(argv: list[str], all_cases: list[Case] | None = None) -> int:
    library, wanted = argv[0], set(argv[1:])
    for case in cases() if all_cases is None else all_cases:
        if wanted and case.id not in wanted:
            continue
        result = run_forked(case, library)
        print(json.dumps({"id": case.id, **result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
