"""Writing ONNX models safely (the one ONNX writer: atomic, external data past one threshold),
reading ONNX files, attaching op bodies."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import onnx
import onnx_ir as ir

from . import custom_ops
from .fileio import atomic_output, regular_file
from .lean_proto import save_inline
from .ort_schemas import node_problem, recheck

# The one external-data threshold, in tensor bytes: a model whose initializers hold more keeps
# them in <name>.data beside it. Protobuf cannot serialise a message of 2 GiB or more; the
# 64 MiB below that are headroom for the graph, the function bodies and the metadata.
PROTOBUF_LIMIT = 2**31 - 64 * 2**20
# The external data file of <name>.onnx is <name>.onnx<DATA_SUFFIX>.
DATA_SUFFIX = ".data"


def attach_functions(model: onnx.ModelProto) -> list[str]:
    """Attach the standard-op body of every ai.attn2onnx op used in ``model``, and of every
    op those bodies call in turn (DcmhaAttention's body calls DcmhaCompose).

    Adds the ``ai.attn2onnx`` opset import as well. Bodies already present are kept, so the
    call is idempotent. Returns the op types whose bodies were attached.
    """
    bodies = custom_ops.function_protos()
    present = {f.name for f in model.functions if f.domain == custom_ops.DOMAIN}
    nodes = list(_all_nodes(model.graph)) + [n for f in model.functions for n in f.node]
    pending = [n.op_type for n in nodes if n.domain == custom_ops.DOMAIN]
    used: set[str] = set()
    attached = []
    while pending:
        op_type = pending.pop()
        if op_type in used:
            continue
        used.add(op_type)
        if op_type not in present and op_type in bodies:
            model.functions.append(bodies[op_type])
            attached.append(op_type)
            pending += [n.op_type for n in bodies[op_type].node if n.domain == custom_ops.DOMAIN]
    attached += _attach_overloads(model, nodes)
    if used and not any(o.domain == custom_ops.DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(custom_ops.DOMAIN, custom_ops.OPSET_VERSION))
    return attached


def _attach_overloads(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> list[str]:
    """Nodes that pass an op's optional inputs call its overload body (``OpDef.overloads``): name
    it on the node and attach it once (overloads need IR version 10). Returns "<op>:<overload>"
    for each body attached."""
    present = {(f.domain, f.name, f.overload) for f in model.functions}
    attached = []
    for node in nodes:
        opdef = custom_ops.REGISTRY.get(node.op_type) if node.domain == custom_ops.DOMAIN else None
        overload = opdef.overload_for(list(node.input)) if opdef is not None else None
        if overload is None:
            continue
        node.overload = overload.name
        model.ir_version = max(model.ir_version, 10)
        if (node.domain, node.op_type, overload.name) not in present:
            model.functions.append(overload.body())
            present.add((node.domain, node.op_type, overload.name))
            attached.append(f"{node.op_type}:{overload.name}")
    return attached


def _all_nodes(graph: onnx.GraphProto):
    """Every node of ``graph`` and of its subgraphs (If/Loop/Scan bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_nodes(g)


def output_files(path: str | os.PathLike) -> list[Path]:
    """The files :func:`save_model` may replace when writing ``path``: the model and its data file."""
    return [Path(path), Path(f"{path}{DATA_SUFFIX}")]


def model_files(path: str | os.PathLike, model: onnx.ModelProto) -> list[Path]:
    """The files ``model`` (read from ``path``, e.g. by :func:`load_onnx`) consists of: the
    model and every external-data file its tensors name."""
    from .external_data import all_tensors

    locations = {
        entry.value
        for tensor in all_tensors(model)
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return [Path(path), *(Path(path).parent / location for location in sorted(locations))]


def _tensor_bytes(model: ir.Model) -> int:
    """Bytes held by the initializers of every graph (external ones counted from their metadata)."""
    return sum(
        v.const_value.nbytes for g in model.graphs() for v in g.initializers.values() if v.const_value is not None
    )


def _has_external_data(model: ir.Model) -> bool:
    """Whether some initializer lives in an external file (it must be written out again: saved
    as is, its relative location would point beside the temporary file)."""
    return any(isinstance(v.const_value, ir.ExternalTensor) for g in model.graphs() for v in g.initializers.values())


def save_model(
    model: onnx.ModelProto | ir.Model, path: str | os.PathLike, check: Callable[[Path], None] | None = None
) -> Path:
    """Save ``model`` to ``path`` atomically (:func:`attn2onnx.fileio.atomic_output`); its
    weights go to ``<name>.data`` beside it when they pass :data:`PROTOBUF_LIMIT` or already
    live in an external file. ``check`` (e.g. :func:`check_model`) runs on the finished
    temporary model, its data beside it: when it raises, the old model and data stay untouched.
    The data file is renamed over its destination first, the model last. Like every output,
    ``path``'s folder must exist (a mistyped folder is an error, not created)."""
    path = Path(path)
    irm = ir.from_proto(model) if isinstance(model, onnx.ModelProto) else model
    external = _has_external_data(irm) or _tensor_bytes(irm) > PROTOBUF_LIMIT
    with atomic_output(path, companions=[DATA_SUFFIX]) as tmp:
        if external:
            ir.save(irm, tmp, external_data=tmp.name + DATA_SUFFIX)
        else:  # one weight's bytes at a time, not three copies of them all
            save_inline(irm, tmp)
        if check is not None:
            check(tmp)
    return path


def check_model(path: str | os.PathLike) -> None:
    """onnx.checker with full_check (shape inference included), by path so >2 GB models work."""
    onnx.checker.check_model(str(path), full_check=True)


def load_onnx(path: str | os.PathLike, *, load_weights: bool = False) -> onnx.ModelProto:
    """Read an ONNX file with one-line errors for a missing, non-regular or non-ONNX file, or
    one that is no valid model. Weights in external data are not loaded unless asked (metadata
    and graph are enough for checks), and every external-data reference is checked to stay
    inside the model's folder before any weight is read (:mod:`attn2onnx.external_data`). Ops
    ONNX Runtime runs that onnx.checker does not know (the fused ops of ``optimize --target ort``)
    are checked against ORT's own schemas instead (:mod:`attn2onnx.ort_schemas`). A PyTorch
    file (told by its first bytes: :mod:`attn2onnx.file_kinds`) is refused saying to export it."""
    from .errors import UsageError
    from .external_data import check_external_data
    from .file_kinds import is_torch_file, torch_file_error

    path = regular_file(path)
    if is_torch_file(path):  # before any parse: a large checkpoint is not read at all
        raise torch_file_error(path)
    # the checker parses a copy of its own: done before ours, the two never coexist (an inline
    # model's weights were held three times at once)
    problem = _structure_problem(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises several unrelated types
        raise UsageError(f"{path} is not a readable ONNX model ({type(e).__name__})") from None
    if not model.graph.node and not model.graph.output:
        raise UsageError(f"{path} is not a readable ONNX model (empty graph)")
    check_external_data(model, path)
    if problem is not None:  # ops ORT runs that the checker does not know are ORT's to check
        problem = recheck(model, problem)
    if problem is None:
        problem = node_problem(model)
    if problem is not None:
        _refuse_structure(model, path, problem)
    if load_weights:
        onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
    return model


def load_ir(path: str | os.PathLike) -> ir.Model:
    """:func:`load_onnx` (its one-line errors and checks), as an ``onnx_ir.Model`` from that one
    parse. Weights in external data stay on disk as ``ir.ExternalTensor`` (memory-mapped where a
    pass reads one, streamed by :func:`save_model`), so a reader holds no copy of them."""
    from .errors import UsageError

    proto = load_onnx(path)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as err:  # noqa: BLE001 - onnx_ir raises many kinds on a malformed proto
        raise UsageError(f"{path} is not a readable ONNX model ({str(err).splitlines()[0]})") from None
    ir.external_data.set_base_dir(model.graph, Path(path).resolve().parent)
    return model


def _structure_problem(path: Path) -> Exception | None:
    """What onnx.checker (without shape inference: cheap, external weights only looked up) finds
    wrong with the file at ``path``, or None: a damaged file that still parses (a flipped byte
    in a name or an op type) is refused, not run or rewritten."""
    try:
        onnx.checker.check_model(str(path))
    except (onnx.checker.ValidationError, ValueError) as e:  # ValueError: a name that is no UTF-8
        return e
    return None


def _refuse_structure(model: onnx.ModelProto, path: Path, problem: Exception | str) -> None:
    """Raise the one-line error for ``problem`` (:func:`_structure_problem`, or a node that breaks
    ONNX Runtime's schema: :func:`attn2onnx.ort_schemas.node_problem`). A broken
    ai.attn2onnx node is reported by the op validator first, whose message names the node and
    the rule."""
    from .custom_ops import check_model as check_nodes
    from .errors import UsageError

    check_nodes(model)
    first = str(problem).strip().splitlines()[0] if str(problem).strip() else type(problem).__name__
    raise UsageError(f"{path} is not a valid ONNX model ({first})")
