"""Writing ONNX models safely: atomic saves, external data above 2 GB, attaching op bodies."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx

from . import custom_ops

# Protobuf cannot serialise a message of 2 GB or more: larger models keep weights outside.
PROTOBUF_LIMIT = 2**31 - 1


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
    if used and not any(o.domain == custom_ops.DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(custom_ops.DOMAIN, custom_ops.OPSET_VERSION))
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


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Save ``model`` to ``path`` atomically; weights go to ``<name>.data`` beside it when the
    model would pass protobuf's 2 GB limit. A failure leaves no partial file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    external = model.ByteSize() > PROTOBUF_LIMIT
    data_name = path.name + ".data"
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".attn2onnx-") as tmp:
        tmp_model = Path(tmp) / path.name
        if external:
            onnx.save_model(model, tmp_model, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
            os.replace(Path(tmp) / data_name, path.parent / data_name)
        else:
            onnx.save_model(model, tmp_model)
        os.replace(tmp_model, path)
    return path


def check_model(path: str | os.PathLike) -> None:
    """onnx.checker with full_check (shape inference included), by path so >2 GB models work."""
    onnx.checker.check_model(str(path), full_check=True)


def load_onnx(path: str | os.PathLike, *, load_weights: bool = False) -> onnx.ModelProto:
    """Read an ONNX file with one-line errors for a missing or non-ONNX file. Weights in
    external data are not loaded unless asked (metadata and graph are enough for checks), and
    every external-data reference is checked to stay inside the model's folder before any
    weight is read (:mod:`attn2onnx.external_data`)."""
    from .errors import UsageError
    from .external_data import check_external_data

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if not path.is_file():
        raise UsageError(f"{path} is not a file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises several unrelated types
        raise UsageError(f"{path} is not a readable ONNX model ({type(e).__name__})") from None
    if not model.graph.node and not model.graph.output:
        raise UsageError(f"{path} is not a readable ONNX model (empty graph)")
    check_external_data(model, path)
    if load_weights:
        onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
    return model
