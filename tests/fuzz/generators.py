"""Hostile inputs for every ``attn2onnx`` command, as generated (parametrised) cases.

A :class:`Case` is a kind (for the report), a name and a ``make`` function that builds its files
in a fresh case folder from the session's tiny source models and returns the argv. Every case
expects the error contract of :mod:`harness`. Mutations are seeded, so each case id names the
same bytes on every run.

File mutations are kept only when the format's own integrity check rejects the result (zip
CRC / structure for .pt, .pt2, .pkl, .npz; protobuf parse or onnx.checker for .onnx): a flip in
a weight or a node name that still leaves a valid file is retried with the next seed.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

SENTINEL = b"pre-existing output: must survive a failed command byte for byte\n"
HUGE = str(2**62)


# --- the session's source models ------------------------------------------------------------
@dataclass(frozen=True)
class Sources:
    """Tiny, valid models every case derives its hostile variants from."""

    checkpoint: Path  # attn2onnx checkpoint (.pt) of a 1-layer DCMHA causal LM
    onnx: Path  # its export (one ai.attn2onnx node, function bodies attached)
    program: Path  # the same model as a torch.export program (.pt2)
    pickled: Path  # the same model as a pickled nn.Module (torch.save of the module)
    inputs: Path  # .npz inputs for the export at batch 1 x 4 tokens


def make_sources(folder: Path) -> Sources:
    """Create the source models once: ``attn2onnx new``, ``attn2onnx export`` (in-process),
    a torch.export program and a pickled module of the same model, and matching inputs."""
    import torch

    import attn2onnx
    from attn2onnx import cli
    from attn2onnx.io_spec import random_inputs, specs_from_onnx
    from attn2onnx.onnx_io import load_onnx
    from attn2onnx.sources import from_module

    checkpoint, onnx_path = folder / "tiny.pt", folder / "tiny.onnx"
    status = cli.main(
        ["new", "dcmha", "-o", str(checkpoint), "--layers", "1", "--d-model", "16", "--heads", "2", "--max-len", "16"]
    )
    assert status == 0, "attn2onnx new failed on the fuzz source model"
    status = cli.main(["export", str(checkpoint), "-o", str(onnx_path), "--no-check", "--batch", "1", "--seq-len", "4"])
    assert status == 0, "attn2onnx export failed on the fuzz source model"
    model = attn2onnx.load(checkpoint)
    program = torch.export.export(model, from_module(model).example_inputs(2, 8))
    torch.export.save(program, folder / "tiny.pt2")
    torch.save(model, folder / "tiny.pkl")
    feeds = random_inputs(specs_from_onnx(load_onnx(onnx_path)), 1, 4)
    np.savez(folder / "inputs.npz", **feeds)
    warm_imports()
    return Sources(checkpoint, onnx_path, folder / "tiny.pt2", folder / "tiny.pkl", folder / "inputs.npz")


def warm_imports() -> None:
    """Import what the commands import lazily, once in the test process: every forked case
    then starts with it loaded instead of paying seconds of imports itself."""
    import importlib

    for name in (
        "attn2onnx.passes",
        "attn2onnx.validate",
        "attn2onnx.runtime",
        "attn2onnx.runtime.sessions",
        "attn2onnx.runtime.tensorrt",
        "attn2onnx.demo",
        "onnxruntime",
        "polygraphy.comparator",
    ):
        importlib.import_module(name)


@dataclass
class Workspace:
    """One case's folder. Everything a case writes or may wrongly touch lives under ``root``."""

    root: Path
    sources: Sources

    @property
    def marker(self) -> Path:
        """The file a payload creates if it ever runs."""
        return self.root / "PAYLOAD_RAN"

    def path(self, name: str) -> str:
        return str(self.root / name)

    def write(self, name: str, data: bytes) -> str:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return str(path)

    def copy(self, source: Path, name: str | None = None) -> str:
        return self.write(name or source.name, source.read_bytes())

    def output(self, name: str) -> str:
        """An output path that already holds a file: a failed command must leave it as it is."""
        return self.write(name, SENTINEL)

    def folder(self, name: str) -> str:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return str(path)


@dataclass(frozen=True)
class Case:
    """One hostile input: ``make(workspace) -> argv`` of ``attn2onnx``."""

    kind: str
    name: str
    make: Callable[[Workspace], list[str]] = field(compare=False)
    slow: bool = False

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.name}"


# --- byte mutations, each kept only when the format's integrity check rejects it --------------
def zip_broken(data: bytes) -> bool:
    """True when ``data`` is no intact zip: bad structure or a member failing its CRC."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            return z.testzip() is not None
    except Exception:  # noqa: BLE001 - zipfile fails on broken bytes in many ways
        return True


def onnx_broken(data: bytes) -> bool:
    """True when ``data`` does not parse as ONNX or fails onnx.checker (full check)."""
    import onnx

    import attn2onnx.custom_ops  # noqa: F401  (our schemas registered, as the commands have them)

    try:
        model = onnx.load_from_string(data)
        onnx.checker.check_model(model, full_check=True)
    except Exception:  # noqa: BLE001 - parse and checker errors
        return True
    return False


ORACLES: dict[str, Callable[[bytes], bool]] = {"zip": zip_broken, "onnx": onnx_broken}


Mutation = Callable[[bytes, np.random.Generator, int], bytes]


def truncate(fraction: float, drop: int = 0) -> Mutation:
    """Keep the first ``fraction`` of the bytes minus ``drop``, one byte shorter per retry."""

    def mutate(data: bytes, rng: np.random.Generator, attempt: int) -> bytes:
        return data[: max(0, int(len(data) * fraction) - drop - attempt)]

    return mutate


def flip(count: int) -> Mutation:
    """XOR ``count`` random bytes with random non-zero values."""

    def mutate(data: bytes, rng: np.random.Generator, attempt: int) -> bytes:
        out = bytearray(data)
        for pos in rng.integers(0, len(out), size=count):
            out[pos] ^= int(rng.integers(1, 256))
        return bytes(out)

    return mutate


def zero_region(size: int) -> Mutation:
    """Zero ``size`` consecutive bytes at a random place."""

    def mutate(data: bytes, rng: np.random.Generator, attempt: int) -> bytes:
        start = int(rng.integers(0, max(1, len(data) - size)))
        return data[:start] + bytes(min(size, len(data) - start)) + data[start + size :]

    return mutate


def append(junk: bytes) -> Mutation:
    """The file followed by ``junk`` (oversized: a reader must not take the front as the file)."""

    def mutate(data: bytes, rng: np.random.Generator, attempt: int) -> bytes:
        return data + junk

    return mutate


MUTATIONS: dict[str, Mutation] = {
    "empty": truncate(0.0),
    "first-byte": lambda data, rng, attempt: data[:1],
    "trunc-10pct": truncate(0.1),
    "trunc-50pct": truncate(0.5),
    "trunc-90pct": truncate(0.9),
    "trunc-last-byte": truncate(1.0, drop=1),
    **{f"flip{n}-s{seed}": flip(n) for seed, n in enumerate((1, 1, 2, 4, 8, 32))},
    **{f"zero{size}-s{seed}": zero_region(size) for seed, size in enumerate((16, 64, 512, 4096))},
    "oversize-1MiB-ff": append(b"\xff" * (1 << 20)),
    "oversize-32MiB-zeros": append(bytes(32 << 20)),
}


def mutated(data: bytes, mutation: str, oracle: str, case_seed: int) -> bytes:
    """``data`` after ``mutation``, retried with the next seed until ``oracle`` calls it broken."""
    broken = ORACLES[oracle]
    for attempt in range(64):
        rng = np.random.default_rng([case_seed, attempt])
        out = MUTATIONS[mutation](data, rng, attempt)
        if broken(out):
            return out
    raise AssertionError(f"mutation {mutation} never broke the file: fix the generator")


# --- hostile files of each kind, through each command that reads that kind ------------------
def _seed(text: str) -> int:
    """A stable seed per (file kind, mutation): the same bytes on every run."""
    import zlib

    return zlib.crc32(text.encode())


FileConsumer = Callable[[Workspace, str], list[str]]
FILE_KINDS: dict[str, tuple[str, str, str, dict[str, FileConsumer]]] = {
    # kind: (source attribute, suffix, oracle, command -> argv)
    "checkpoint": (
        "checkpoint",
        ".pt",
        "zip",
        {
            "export": lambda ws, p: ["export", p, "-o", ws.output("out.onnx"), "--no-check"],
            "validate-reference": lambda ws, p: ["validate", ws.copy(ws.sources.onnx), "--reference", p],
        },
    ),
    "program": (
        "program",
        ".pt2",
        "zip",
        {
            "export": lambda ws, p: ["export", p, "-o", ws.output("out.onnx"), "--no-check"],
            "validate-reference": lambda ws, p: ["validate", ws.copy(ws.sources.onnx), "--reference", p],
        },
    ),
    "pickle": (
        "pickled",
        ".pkl",
        "zip",
        {
            "export": lambda ws, p: ["export", p, "-o", ws.output("out.onnx"), "--no-check"],
            "export-trusted": lambda ws, p: ["export", p, "-o", ws.output("out.onnx"), "--no-check", "--trust-pickle"],
            "validate-trusted": lambda ws, p: [
                "validate",
                ws.copy(ws.sources.onnx),
                "--reference",
                p,
                "--trust-pickle",
            ],
        },
    ),
    "onnx": (
        "onnx",
        ".onnx",
        "onnx",
        {
            "optimize": lambda ws, p: ["optimize", p, "-o", ws.output("out.onnx")],
            "run": lambda ws, p: ["run", p, "-o", ws.output("out.npz")],
            "validate": lambda ws, p: ["validate", p, "--reference", ws.copy(ws.sources.checkpoint)],
            "build-engine": lambda ws, p: ["build-engine", p, "-o", ws.output("out.engine")],
        },
    ),
    "npz": (
        "inputs",
        ".npz",
        "zip",
        {
            "run-inputs": lambda ws, p: ["run", ws.copy(ws.sources.onnx), "--inputs", p, "-o", ws.output("out.npz")],
        },
    ),
}
# Commands that go on to a full export or comparison when a damaged file is wrongly accepted.
SLOW_CONSUMERS = {"export", "export-trusted", "validate-reference", "validate-trusted"}


def file_cases() -> list[Case]:
    """Truncated, corrupted and oversized files of every kind, through every command reading it."""
    cases = []
    for kind, (attribute, suffix, oracle, consumers) in FILE_KINDS.items():
        for mutation in MUTATIONS:
            for command, consumer in consumers.items():

                def make(
                    ws: Workspace,
                    attribute=attribute,
                    suffix=suffix,
                    oracle=oracle,
                    mutation=mutation,
                    consumer=consumer,
                    kind=kind,
                ) -> list[str]:
                    data = getattr(ws.sources, attribute).read_bytes()
                    bad = mutated(data, mutation, oracle, _seed(f"{kind}/{mutation}"))
                    return consumer(ws, ws.write(f"hostile{suffix}", bad))

                cases.append(Case(f"corrupt-{kind}", f"{mutation}/{command}", make, slow=command in SLOW_CONSUMERS))
    return cases


# --- pickles whose loading runs code ---------------------------------------------------------
class Payload:
    """Pickles as a call of ``function(*args)``: loading it runs that call."""

    def __init__(self, function: Callable[..., Any], *args: Any) -> None:
        self.function, self.args = function, args

    def __reduce__(self) -> tuple:
        return self.function, self.args


def payload(how: str, marker: Path) -> Payload:
    """A payload that creates ``marker`` when unpickled, by one of several routes."""
    import builtins
    import subprocess

    routes: dict[str, Payload] = {
        "os-system": Payload(os.system, f"touch '{marker}'"),
        "open": Payload(builtins.open, str(marker), "w"),
        "exec": Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
        "eval": Payload(builtins.eval, f"__import__('pathlib').Path({str(marker)!r}).touch()"),
        "subprocess": Payload(subprocess.call, ["touch", str(marker)]),
    }
    return routes[how]


def torch_bytes(obj: Any) -> bytes:
    """``torch.save(obj)`` as bytes (the zip format every .pt uses)."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


PICKLE_SHAPES: dict[str, Callable[[Payload], bytes]] = {
    "torch-zip": torch_bytes,
    "raw-protocol0": lambda p: pickle.dumps(p, protocol=0),
    "raw-protocol2": lambda p: pickle.dumps(p, protocol=2),
    "raw-protocol5": lambda p: pickle.dumps(p, protocol=5),
    "checkpoint-config": lambda p: torch_bytes({"format": "attn2onnx", "version": 1, "config": p, "state_dict": {}}),
    "checkpoint-state-dict": lambda p: torch_bytes(
        {"format": "attn2onnx", "version": 1, "config": {}, "state_dict": {"weight": p}}
    ),
}
PICKLE_ROUTES = {
    "torch-zip": ("os-system", "open", "exec", "eval", "subprocess"),
    "raw-protocol0": ("open",),
    "raw-protocol2": ("os-system", "exec"),
    "raw-protocol5": ("eval",),
    "checkpoint-config": ("os-system", "open"),
    "checkpoint-state-dict": ("exec",),
}
PICKLE_CONSUMERS: dict[str, tuple[str, FileConsumer]] = {
    "export-pt": (".pt", lambda ws, p: ["export", p, "-o", ws.output("out.onnx"), "--no-check"]),
    "export-pkl": (".pkl", lambda ws, p: ["export", p, "-o", ws.output("out.onnx"), "--no-check"]),
    "validate-reference-pt": (".pt", lambda ws, p: ["validate", ws.copy(ws.sources.onnx), "--reference", p]),
    "validate-reference-pkl": (".pkl", lambda ws, p: ["validate", ws.copy(ws.sources.onnx), "--reference", p]),
}


def pickle_payload_cases() -> list[Case]:
    """Pickles (raw and torch zip, bare and inside a checkpoint) that create a marker if loaded,
    given without --trust-pickle."""
    cases = []
    for shape, routes in PICKLE_ROUTES.items():
        for route in routes:
            for command, (suffix, consumer) in PICKLE_CONSUMERS.items():

                def make(ws: Workspace, shape=shape, route=route, suffix=suffix, consumer=consumer) -> list[str]:
                    return consumer(ws, ws.write(f"payload{suffix}", PICKLE_SHAPES[shape](payload(route, ws.marker))))

                cases.append(Case("payload-pickle", f"{shape}/{route}/{command}", make))
    return cases


def _rewrite_zip(data: bytes, edit: Callable[[dict[str, bytes]], None]) -> bytes:
    """A zip with its members edited by ``edit`` (name -> bytes, in place), order kept."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        members = {info.filename: z.read(info) for info in z.infolist()}
    edit(members)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as z:
        for name, content in members.items():
            z.writestr(name, content)
    return buffer.getvalue()


def _program_weight_pickled(members: dict[str, bytes], blob: bytes) -> None:
    """First weight of the program marked ``use_pickle`` and replaced by ``blob``."""
    config_name = next(n for n in members if n.endswith("model_weights_config.json"))
    config = json.loads(members[config_name])
    entry = next(iter(config["config"].values()))
    entry["use_pickle"] = True
    members[config_name] = json.dumps(config).encode()
    weight_name = next(n for n in members if n.endswith("/" + entry["path_name"]))
    members[weight_name] = blob


def _program_sample_inputs(members: dict[str, bytes], blob: bytes) -> None:
    """Sample inputs replaced by ``blob`` (torch falls back to weights_only=False for them)."""
    name = next(n for n in members if "/sample_inputs/" in n)
    members[name] = blob


def _program_opaque_constant(members: dict[str, bytes], blob: bytes) -> None:
    """An extra opaque-object constant whose bytes are a plain pickle of the payload."""
    from torch.export.pt2_archive.constants import OPAQUE_OBJ_FILENAME_PREFIX

    config_name = next(n for n in members if n.endswith("model_constants_config.json"))
    config = json.loads(members[config_name])
    path_name = f"{OPAQUE_OBJ_FILENAME_PREFIX}0"
    config["config"]["fuzz_payload"] = {
        "path_name": path_name,
        "is_param": False,
        "use_pickle": True,
        "tensor_meta": None,
    }
    members[config_name] = json.dumps(config).encode()
    members[config_name.rsplit("/", 1)[0] + "/" + path_name] = blob


PROGRAM_VECTORS: dict[str, tuple[Callable[[dict[str, bytes], bytes], None], Callable[[Payload], bytes]]] = {
    "pickled-weight": (_program_weight_pickled, torch_bytes),
    "sample-inputs": (_program_sample_inputs, torch_bytes),
    "opaque-constant": (_program_opaque_constant, lambda p: pickle.dumps(p, protocol=2)),
}
PROGRAM_CONSUMERS: dict[str, FileConsumer] = {
    "export": lambda ws, p: ["export", p, "-o", ws.output("out.onnx"), "--no-check"],
    "validate-reference": lambda ws, p: ["validate", ws.copy(ws.sources.onnx), "--reference", p],
}


def program_payload_cases() -> list[Case]:
    """.pt2 archives with a pickled payload in each place torch.export.load unpickles freely."""
    cases = []
    for vector, (edit, encode) in PROGRAM_VECTORS.items():
        for route in ("os-system", "open", "exec"):
            for command, consumer in PROGRAM_CONSUMERS.items():

                def make(ws: Workspace, edit=edit, encode=encode, route=route, consumer=consumer) -> list[str]:
                    blob = encode(payload(route, ws.marker))
                    data = _rewrite_zip(ws.sources.program.read_bytes(), lambda m: edit(m, blob))
                    return consumer(ws, ws.write("payload.pt2", data))

                cases.append(Case("payload-pt2", f"{vector}/{route}/{command}", make))
    return cases


# --- ONNX external data escaping the model folder --------------------------------------------
def external_model(ws: Workspace, location: str, offset: str | None = None, length: str | None = None) -> str:
    """The source export in ``model/`` with its largest initializer moved to external data at
    ``location``. The right bytes also sit outside the folder (``outside.bin``) and inside it
    (``model/weights.bin``), so a loader that follows an escaping path would succeed."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(ws.sources.onnx))
    tensor = max(model.graph.initializer, key=lambda t: numpy_helper.to_array(t).nbytes)
    data = numpy_helper.to_array(tensor).tobytes()
    ws.write("outside.bin", data)
    ws.write("model/weights.bin", data)
    for name in ("raw_data", "float_data", "int64_data", "int32_data"):
        tensor.ClearField(name)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        if value is not None:
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    return ws.write("model/model.onnx", model.SerializeToString())


def _linked(location: str, name: str, target: Callable[[Workspace], Path]) -> Callable[[Workspace], str]:
    """external_model at ``location`` plus a symlink ``model/<name>`` -> ``target(ws)``."""

    def build(ws: Workspace) -> str:
        path = external_model(ws, location)
        os.symlink(target(ws), ws.root / "model" / name)
        return path

    return build


def _with_folder(folder: str, location: str) -> Callable[[Workspace], str]:
    """external_model at ``location`` with the folder ``model/<folder>`` present."""

    def build(ws: Workspace) -> str:
        ws.folder(f"model/{folder}")
        return external_model(ws, location)

    return build


EXTERNAL_LOCATIONS: dict[str, Callable[[Workspace], str]] = {
    "parent-relative": lambda ws: external_model(ws, "../outside.bin"),
    "etc-passwd-relative": lambda ws: external_model(ws, "../" * 12 + "etc/passwd"),
    "absolute-outside": lambda ws: external_model(ws, str(ws.root / "outside.bin")),
    "etc-passwd-absolute": lambda ws: external_model(ws, "/etc/passwd"),
    "dotdot-through-subfolder": _with_folder("sub", "sub/../../outside.bin"),
    "symlink-file-out": _linked("link.bin", "link.bin", lambda ws: ws.root / "outside.bin"),
    "symlink-folder-out": _linked("up/outside.bin", "up", lambda ws: ws.root),
    "offset-past-end": lambda ws: external_model(ws, "weights.bin", offset=str(10**6)),
    "length-past-end": lambda ws: external_model(ws, "weights.bin", length=str(10**6)),
    "offset-plus-length-past-end": lambda ws: external_model(ws, "weights.bin", offset="64", length=str(10**6)),
    "negative-offset": lambda ws: external_model(ws, "weights.bin", offset="-1"),
    "length-not-a-number": lambda ws: external_model(ws, "weights.bin", length="lots"),
    "missing-file": lambda ws: external_model(ws, "missing.bin"),
    "location-is-folder": _with_folder("weights.d", "weights.d"),
    "empty-location": lambda ws: external_model(ws, ""),
    "nul-in-location": lambda ws: external_model(ws, "weights.bin\x00/../../outside.bin"),
}
EXTERNAL_COMMANDS: dict[str, FileConsumer] = {
    "optimize": lambda ws, p: ["optimize", p, "-o", ws.output("model/out.onnx")],
    "run": lambda ws, p: ["run", p, "-o", ws.output("out.npz")],
    "validate": lambda ws, p: ["validate", p, "--reference", ws.copy(ws.sources.checkpoint)],
}


def external_data_cases() -> list[Case]:
    """Initializers whose external data escapes the model folder or lies past a file's end."""
    return [
        Case("external-data", f"{name}/{command}", lambda ws, build=build, consumer=consumer: consumer(ws, build(ws)))
        for name, build in EXTERNAL_LOCATIONS.items()
        for command, consumer in EXTERNAL_COMMANDS.items()
    ]


# --- malformed ai.attn2onnx nodes ------------------------------------------------------------
# Valid inputs (shapes) and attributes of every op at batch 1, 4 tokens, 2 heads of width 4.
_QKV = {"q": (1, 4, 2, 4), "k": (1, 4, 2, 4), "v": (1, 4, 2, 4)}
_MIX = {
    f"{stage}_{kind}_{side}": ((2, 2) if kind == "mix" else (2,))
    for stage in ("pre", "post")
    for side in ("q", "k")
    for kind in ("mix", "bias")
}
OP_INPUTS: dict[str, dict[str, tuple[int, ...]]] = {
    "SuperMix": {"x": (1, 4, 8), "wa": (6, 6), "key_padding_mask": (1, 4)},
    "ProbAttention": {**_QKV, "key_padding_mask": (1, 4)},
    "LandmarkAttention": {**_QKV, "key_padding_mask": (1, 4), **_MIX},
    "PooledNormAttention": {**_QKV, "key_padding_mask": (1, 4)},
    "DcmhaCompose": {"a": (1, 2, 4, 4), "q_factors": (1, 4, 3, 2), "k_factors": (1, 4, 3, 2), "static_mix": (2, 2)},
    "DcmhaAttention": {
        **_QKV,
        "q_factors": (1, 4, 2, 3, 2),
        "k_factors": (1, 4, 2, 3, 2),
        "key_padding_mask": (1, 4),
        "static_mix": (2, 2, 2),
    },
}
OP_ATTRIBUTES: dict[str, dict[str, Any]] = {
    "SuperMix": {"causal": 1},
    "ProbAttention": {"scale": 0.0, "causal": 1},
    "LandmarkAttention": {"landmarks": 2, "grid": 0, "scale": 0.0},
    "PooledNormAttention": {"factors": [1, 2], "normalize": 1, "eps": 1e-5, "beta": 1.0, "rescale": 1, "scale": 0.0},
    "DcmhaCompose": {"use_static_mix": 1},
    "DcmhaAttention": {"scale": 0.0, "causal": 1, "window": 2, "use_static_mix": 1},
}
OP_OUTPUTS = {"ProbAttention": ("o", "probs")}
OUTPUT_RANKS = {"SuperMix": 3}  # every other op's outputs have rank 4
MISSING = object()  # an attribute value meaning "leave the attribute out"

_FLAG = {"-1": -1, "2": 2, "huge": 2**62}
_NON_FINITE = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}
# Out-of-range values per attribute (wrong types are added for every attribute by its type).
OUT_OF_RANGE: dict[str, dict[str, Any]] = {
    "causal": _FLAG,
    "use_static_mix": _FLAG,
    "normalize": _FLAG,
    "rescale": _FLAG,
    "aot": _FLAG,
    "scale": _NON_FINITE,
    "eps": {**_NON_FINITE, "negative": -1.0},
    "beta": _NON_FINITE,
    "landmarks": {"zero": 0, "-1": -1, "huge": 2**62},
    "grid": {"-1": -1, "huge": 2**62},
    "window": {"-1": -1, "-huge": -(2**62)},
    "factors": {
        "empty": [],
        "too-few": [1],
        "too-many": [1, 1, 1],
        "zero": [0, 1],
        "negative": [-1, 1],
        "huge": [2**62, 1],
    },
    "plugin_namespace": {},
}
WRONG_TYPES: dict[str, dict[str, Any]] = {  # by the schema's attribute type name
    "INT": {"as-float": 0.5, "as-string": "1", "as-ints": [1, 1]},
    "FLOAT": {"as-string": "0.5", "as-floats": [0.5, 0.5]},
    "INTS": {"as-int": 1, "as-floats": [1.0, 2.0]},
    "STRING": {"as-int": 7},
}
# Combinations each value of which is in range but that contradict each other.
CONTRADICTIONS: dict[str, dict[str, dict[str, Any]]] = {
    "DcmhaAttention": {"window-without-causal": {"causal": 0, "window": 2}},
    "LandmarkAttention": {"landmarks-not-grid-squared": {"grid": 2, "landmarks": 3}},
}


def op_model(
    op: str,
    attributes: dict[str, Any] | None = None,
    shapes: dict[str, tuple[int, ...]] | None = None,
    op_type: str | None = None,
    domain_version: int | None = None,
) -> bytes:
    """A one-node model of ``op`` over graph inputs (bodies attached), with attributes and input
    shapes overridden where given (an attribute set to MISSING is left out)."""
    from onnx import TensorProto, helper

    from attn2onnx.custom_ops import DOMAIN, OPSET_VERSION
    from attn2onnx.onnx_io import attach_functions

    shapes = OP_INPUTS[op] if shapes is None else shapes
    attrs = {**OP_ATTRIBUTES[op], **(attributes or {})}
    inputs = [
        helper.make_tensor_value_info(
            name, TensorProto.BOOL if name == "key_padding_mask" else TensorProto.FLOAT, list(shape)
        )
        for name, shape in shapes.items()
    ]
    outputs = OP_OUTPUTS.get(op, ("out",))
    node = helper.make_node(op_type or op, list(shapes), list(outputs), domain=DOMAIN)
    node.attribute.extend(_attribute(op, k, v) for k, v in attrs.items() if v is not MISSING)
    rank = OUTPUT_RANKS.get(op, 4)  # a valid model declares its outputs' shapes (onnx.checker)
    graph = helper.make_graph(
        [node],
        f"fuzz_{op}",
        inputs,
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, [f"{o}{i}" for i in range(rank)]) for o in outputs],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)
    attach_functions(model)
    for opset in model.opset_import:
        if opset.domain == DOMAIN:
            opset.version = OPSET_VERSION if domain_version is None else domain_version
    return model.SerializeToString()


def _attribute(op: str, name: str, value: Any):
    """The attribute ``name=value``; an empty list gets its type from the op's schema (the
    helper cannot infer one from no entries)."""
    from onnx import AttributeProto, helper

    if isinstance(value, list) and not value:
        return helper.make_attribute(
            name, value, attr_type=AttributeProto.AttributeType.Value(schema_attributes(op)[name])
        )
    return helper.make_attribute(name, value)


def schema_attributes(op: str) -> dict[str, str]:
    """Attribute name -> type name (INT, FLOAT, INTS, STRING) from the op's registered schema."""
    import onnx.defs

    from attn2onnx.custom_ops import DOMAIN, OPSET_VERSION

    schema = onnx.defs.get_schema(op, OPSET_VERSION, DOMAIN)
    return {name: attr.type.name for name, attr in schema.attributes.items()}


def required_attributes(op: str) -> list[str]:
    """Attributes the op's function body declares without a default."""
    from attn2onnx.custom_ops import function_protos

    return list(function_protos()[op].attribute)


NODE_COMMANDS: dict[str, FileConsumer] = {
    "run": lambda ws, p: ["run", p, "-o", ws.output("out.npz")],
    "optimize": lambda ws, p: ["optimize", p, "-o", ws.output("out.onnx")],
}


def _node_case(kind: str, name: str, command: str, build: Callable[[], bytes]) -> Case:
    return Case(kind, f"{name}/{command}", lambda ws: NODE_COMMANDS[command](ws, ws.write("node.onnx", build())))


def attribute_variants(op: str) -> dict[str, dict[str, Any]]:
    """Every hostile attribute setting of ``op``: label -> attribute overrides."""
    variants: dict[str, dict[str, Any]] = {}
    for attr, type_name in schema_attributes(op).items():
        if attr not in OUT_OF_RANGE:
            raise AssertionError(f"{op}.{attr} has no out-of-range values in the fuzz tables: add them")
        for label, value in {**OUT_OF_RANGE[attr], **WRONG_TYPES[type_name]}.items():
            variants[f"{attr}={label}"] = {attr: value}
    for attr in required_attributes(op):
        variants[f"{attr}=missing"] = {attr: MISSING}
    variants.update(CONTRADICTIONS.get(op, {}))
    return variants


def node_cases() -> list[Case]:
    """Malformed ai.attn2onnx nodes: attributes out of range or of the wrong type, missing
    required attributes, wrong input ranks and counts, an unknown op type, a wrong domain version."""
    from attn2onnx.custom_ops import OPSET_VERSION

    cases = []
    for op, shapes in OP_INPUTS.items():
        for label, overrides in attribute_variants(op).items():
            for command in NODE_COMMANDS:
                cases.append(
                    _node_case(
                        "node-attribute",
                        f"{op}/{label}",
                        command,
                        lambda op=op, overrides=overrides: op_model(op, overrides),
                    )
                )
        for name, shape in shapes.items():
            for label, bad in (("rank+1", (*shape, 1)), ("rank-1", shape[:-1])):
                changed = {**shapes, name: bad}
                cases.append(
                    _node_case(
                        "node-input-rank",
                        f"{op}/{name}:{label}",
                        "run",
                        lambda op=op, changed=changed: op_model(op, shapes=changed),
                    )
                )
        names = list(shapes)
        fewer = {n: shapes[n] for n in names[:-1]}
        more = {**shapes, "extra": shapes[names[0]]}
        for label, changed in (("one-input-fewer", fewer), ("one-input-more", more)):
            cases.append(
                _node_case(
                    "node-input-count",
                    f"{op}/{label}",
                    "run",
                    lambda op=op, changed=changed: op_model(op, shapes=changed),
                )
            )
    for command in NODE_COMMANDS:
        cases.append(
            _node_case(
                "node-unknown-op",
                f"NoSuchAttention/{command}",
                command,
                lambda: op_model("ProbAttention", op_type="NoSuchAttention"),
            )
        )
        for version in (0, OPSET_VERSION + 1, 99):
            cases.append(
                _node_case(
                    "node-domain-version",
                    f"v{version}/{command}",
                    command,
                    lambda version=version: op_model("ProbAttention", domain_version=version),
                )
            )
    return cases


def node_baselines() -> dict[str, Callable[[], bytes]]:
    """The valid one-node model of every op (controls: they must run, or the cases test nothing)."""
    return {op: (lambda op=op: op_model(op)) for op in OP_INPUTS}


# --- option values at and past their limits --------------------------------------------------
BAD_COUNTS = {"zero": "0", "-1": "-1", "huge": HUGE, "not-a-number": "abc", "empty": "", "float": "1.5", "nan": "nan"}
# Seeds take 0 .. 2**64 - 1: zero and 2**62 are fine, -1 and 2**70 are past the limits.
BAD_SEEDS = {label: value for label, value in BAD_COUNTS.items() if label not in ("zero", "huge")}
ArgvMaker = Callable[[Workspace, list[str]], list[str]]
OPTION_COMMANDS: dict[str, ArgvMaker] = {
    "new": lambda ws, extra: ["new", "dcmha", "-o", ws.output("out.pt"), *extra],
    "new-image": lambda ws, extra: [
        "new",
        "imhsa",
        "-o",
        ws.output("out.pt"),
        "--family",
        "encoder",
        "--image-size",
        "8",
        "--patch-size",
        "4",
        *extra,
    ],
    "export": lambda ws, extra: [
        "export",
        ws.copy(ws.sources.checkpoint),
        "-o",
        ws.output("out.onnx"),
        "--no-check",
        *extra,
    ],
    "optimize": lambda ws, extra: ["optimize", ws.copy(ws.sources.onnx), "-o", ws.output("out.onnx"), *extra],
    "run": lambda ws, extra: ["run", ws.copy(ws.sources.onnx), "-o", ws.output("out.npz"), *extra],
    "validate": lambda ws, extra: [
        "validate",
        ws.copy(ws.sources.onnx),
        "--reference",
        ws.copy(ws.sources.checkpoint),
        *extra,
    ],
    "build-engine": lambda ws, extra: ["build-engine", ws.copy(ws.sources.onnx), "-o", ws.output("out.engine"), *extra],
    "demo": lambda ws, extra: ["demo", "--out", ws.path("demo_out"), *extra],
    "variants": lambda ws, extra: ["variants", *extra],
    "doctor": lambda ws, extra: ["doctor", *extra],
}
# command -> option -> label -> value; counts get BAD_COUNTS.
COUNT_OPTIONS = {
    "new": ("--layers", "--d-model", "--heads", "--max-len", "--vocab-size", "--num-classes", "--mlp-hidden", "--seed"),
    "new-image": ("--channels", "--image-size", "--patch-size"),
    "export": ("--batch", "--seq-len", "--opset"),
    "run": ("--batch", "--seq-len", "--threads"),
    "validate": ("--seed",),
}
OTHER_VALUES: dict[str, dict[str, dict[str, str]]] = {
    "new": {
        "--option": {
            "no-equals": "window",
            "empty-key": "=3",
            "window-negative": "window=-1",
            "window-huge": f"window={HUGE}",
            "rope-not-bool": "rope=maybe",
            "unknown": "nosuch=1",
            "empty": "",
        },
        "--family": {"unknown": "nosuch", "empty": ""},
        "--seed": {"past-64-bit": str(2**70)},
        "--mlp": {"unknown": "relu"},
        "VARIANT": {"unknown": "nosuch", "empty": ""},
    },
    "export": {
        "--dtype": {"unknown": "fp8"},
        "--target": {"unknown": "gpu"},
        "--opset": {"too-old": "1", "too-new": "99"},
        "--seq-len": {"past-max-len": "17"},
    },
    "optimize": {"--target": {"unknown": "gpu", "empty": ""}},
    "run": {"--backend": {"unknown": "cuda"}, "--threads": {"past-64-bit": str(2**70)}},
    "validate": {
        "--shapes": {
            "zero-batch": "0x5",
            "negative": "-1x5",
            "zero-seq": "1x0",
            "huge": f"{HUGE}x5",
            "past-max-len": "1x17",
            "not-a-shape": "abc",
            "empty": "",
            "empty-item": "1x5,,2x3",
            "three-dims": "1x2x3",
        },
        "--seed": {"past-64-bit": str(2**70)},
        "--backends": {"empty": "", "unknown": "cuda", "commas-only": ",,"},
        "--dtype": {"mismatch": "fp16", "unknown": "fp8"},
    },
    "build-engine": {
        "--shapes": {
            "two-parts": "1x1/2x2",
            "min-above-opt": "2x2/1x1/3x3",
            "zero": "0x1/1x1/1x1",
            "not-a-shape": "abc",
            "empty": "",
        },
        "--dim": {
            "no-equals": "seq",
            "two-values": "seq=1,2",
            "negative": "seq=-1,0,1",
            "not-numbers": "seq=a,b,c",
            "unknown-symbol": "nosuch=1,2,3",
        },
        "--workspace-gb": {"zero": "0", "-1": "-1", "nan": "nan", "inf": "inf", "not-a-number": "abc"},
    },
    "demo": {"--variants": {"empty": "", "unknown": "nosuch", "commas-only": ",,"}},
    "variants": {"--bogus": {"flag": ""}},
    "doctor": {"--bogus": {"flag": ""}},
}
# Option cases that, wrongly accepted, build or export a whole model: slow.
SLOW_OPTIONS = {
    ("new", "--layers"),
    ("new", "--d-model"),
    ("new", "--max-len"),
    ("new", "--vocab-size"),
    ("new", "--mlp-hidden"),
    ("new", "--num-classes"),
    ("export", "--opset"),
    ("demo", "--variants"),
}


def _option_argv(option: str, value: str) -> list[str]:
    """The argv fragment of one option (a flag without value when value is empty and the
    option is made up; the positional VARIANT replaces the variant name)."""
    if option == "--bogus":
        return [option]
    return [f"{option}={value}"] if value.startswith("-") else [option, value]


def option_cases() -> list[Case]:
    """Every command's options at and past their limits: 0, -1, huge, non-numbers, empty, unknown."""
    cases = []
    table: dict[tuple[str, str], dict[str, str]] = {}
    for command, options in COUNT_OPTIONS.items():
        for option in options:
            table[(command, option)] = dict(BAD_SEEDS if option == "--seed" else BAD_COUNTS)
    for command, options in OTHER_VALUES.items():
        for option, values in options.items():
            table.setdefault((command, option), {}).update(values)
    for (command, option), values in table.items():
        for label, value in values.items():

            def make(ws: Workspace, command=command, option=option, value=value) -> list[str]:
                if option == "VARIANT":
                    return ["new", value, "-o", ws.output("out.pt")]
                return OPTION_COMMANDS[command](ws, _option_argv(option, value))

            cases.append(Case("option", f"{command}/{option}={label}", make, slow=(command, option) in SLOW_OPTIONS))
    return cases


# --- paths: outputs equal to inputs, unwritable destinations, folders and FIFOs as files ------
def unwritable_folder(ws: Workspace) -> str | None:
    """A folder no file can be created in, or None where this machine has none. As root,
    chmod stops nothing: then /proc (no regular files can be created there) when that holds."""
    if os.geteuid() != 0:
        path = ws.folder("read-only")
        os.chmod(path, 0o555)
        return path
    try:
        probe = os.open("/proc/attn2onnx-fuzz-probe", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return "/proc"
    os.close(probe)
    os.unlink("/proc/attn2onnx-fuzz-probe")
    return None


def _under_regular_file(ws: Workspace, name: str) -> str:
    """A destination below a regular file: no folder there can ever be created."""
    return os.path.join(ws.output("regular-file"), name)


def _fifo(ws: Workspace, name: str) -> str:
    """A named pipe with no writer: opening it to read blocks forever."""
    path = ws.path(name)
    os.mkfifo(path)
    return path


def _alias(ws: Workspace, source: Path, name: str) -> tuple[str, str]:
    """``source`` copied in and a symlink to it: two spellings of one file."""
    real = ws.copy(source, name)
    link = ws.path("alias-" + name)
    os.symlink(real, link)
    return real, link


WRITERS: dict[str, Callable[[Workspace, str], list[str]]] = {  # command writing to a given destination
    "new": lambda ws, out: ["new", "mha", "-o", out, "--layers", "1", "--d-model", "16", "--heads", "2"],
    "export": lambda ws, out: ["export", ws.copy(ws.sources.checkpoint), "-o", out, "--no-check"],
    "optimize": lambda ws, out: ["optimize", ws.copy(ws.sources.onnx), "-o", out],
    "run": lambda ws, out: ["run", ws.copy(ws.sources.onnx), "-o", out],
    "build-engine": lambda ws, out: ["build-engine", ws.copy(ws.sources.onnx), "-o", out],
}
WRITER_SUFFIX = {"new": ".pt", "export": ".onnx", "optimize": ".onnx", "run": ".npz", "build-engine": ".engine"}
READERS: dict[str, Callable[[Workspace, str], list[str]]] = {  # command reading a given model / input path
    "export": lambda ws, p: ["export", p, "-o", ws.output("out.onnx"), "--no-check"],
    "optimize": lambda ws, p: ["optimize", p, "-o", ws.output("out.onnx")],
    "run": lambda ws, p: ["run", p, "-o", ws.output("out.npz")],
    "run-inputs": lambda ws, p: ["run", ws.copy(ws.sources.onnx), "--inputs", p, "-o", ws.output("out.npz")],
    "validate": lambda ws, p: ["validate", p, "--reference", ws.copy(ws.sources.checkpoint)],
    "validate-reference": lambda ws, p: ["validate", ws.copy(ws.sources.onnx), "--reference", p],
    "build-engine": lambda ws, p: ["build-engine", p, "-o", ws.output("out.engine")],
}


def _over_input(ws: Workspace, source: Path, argv: Callable[[str], list[str]]) -> list[str]:
    """``argv(path)`` for a copy of ``source``: the command's output is its own input."""
    return argv(ws.copy(source))


def _same_file_cases() -> list[Case]:
    """Output paths that name an input (directly, spelled differently, or through a symlink)."""

    def optimize(ws: Workspace, spelling: str) -> list[str]:
        real, link = _alias(ws, ws.sources.onnx, "model.onnx")
        out = {"same": real, "dot-slash": str(Path(real).parent / "." / "model.onnx"), "symlink": link}[spelling]
        return ["optimize", real, "-o", out]

    def run_over(ws: Workspace, which: str) -> list[str]:
        model, inputs = ws.copy(ws.sources.onnx), ws.copy(ws.sources.inputs)
        return ["run", model, "--inputs", inputs, "-o", model if which == "model" else inputs]

    cases = [
        Case("same-path", f"optimize/{s}", lambda ws, s=s: optimize(ws, s)) for s in ("same", "dot-slash", "symlink")
    ]
    cases += [Case("same-path", f"run/over-{w}", lambda ws, w=w: run_over(ws, w)) for w in ("model", "inputs")]
    cases.append(
        Case(
            "same-path",
            "build-engine/over-model",
            lambda ws: _over_input(ws, ws.sources.onnx, lambda p: ["build-engine", p, "-o", p]),
        )
    )
    cases.append(
        Case(
            "same-path",
            "export/over-checkpoint",
            lambda ws: _over_input(ws, ws.sources.checkpoint, lambda p: ["export", p, "-o", p, "--no-check"]),
        )
    )
    return cases


def _unwritable(ws: Workspace, command: str, how: str) -> list[str]:
    name = "out" + WRITER_SUFFIX[command]
    if how == "under-regular-file":
        return WRITERS[command](ws, _under_regular_file(ws, name))
    folder = unwritable_folder(ws)
    if folder is None:
        import pytest

        pytest.skip("no unwritable folder on this machine (root, and /proc accepts files)")
    return WRITERS[command](ws, os.path.join(folder, name))


def path_cases() -> list[Case]:
    """Outputs equal to inputs, unwritable destinations, folders where files are expected, FIFOs
    (a reader would block) and missing files, for every command that reads or writes files."""
    cases = _same_file_cases()
    for command in WRITERS:
        for how in ("under-regular-file", "read-only-folder"):
            cases.append(
                Case("unwritable-output", f"{command}/{how}", lambda ws, c=command, h=how: _unwritable(ws, c, h))
            )
        cases.append(
            Case(
                "folder-as-file",
                f"{command}/output-is-folder",
                lambda ws, c=command: WRITERS[c](ws, ws.folder("out" + WRITER_SUFFIX[c])),
            )
        )
        cases.append(
            Case(
                "folder-as-file",
                f"{command}/output-folder-missing",
                lambda ws, c=command: WRITERS[c](ws, ws.path("no/such/folder/out" + WRITER_SUFFIX[c])),
            )
        )
    for command, reader in READERS.items():
        cases.append(
            Case("folder-as-file", f"{command}/input-is-folder", lambda ws, r=reader: r(ws, ws.folder("model.onnx")))
        )
        cases.append(Case("fifo-input", f"{command}/fifo", lambda ws, r=reader: r(ws, _fifo(ws, "model.onnx"))))
        cases.append(Case("missing-input", f"{command}/missing", lambda ws, r=reader: r(ws, ws.path("missing.onnx"))))
        cases.append(Case("missing-input", f"{command}/empty-path", lambda ws, r=reader: r(ws, "")))
    cases.append(
        Case(
            "folder-as-file",
            "demo/out-is-regular-file",
            lambda ws: ["demo", "--out", ws.output("demo_out"), "--variants", "mha"],
        )
    )
    return cases


def all_in_process_cases() -> list[Case]:
    """Every generated case that runs through cli.main (forked), in a stable order."""
    return (
        file_cases()
        + pickle_payload_cases()
        + program_payload_cases()
        + external_data_cases()
        + node_cases()
        + option_cases()
        + path_cases()
    )
