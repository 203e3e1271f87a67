"""Open a torch file of any kind (a ``.pt`` checkpoint, a pickled module, a ``.pt2``
torch.export program) under one policy, so that no file runs code or exhausts memory unless
the user trusts it (``--trust-pickle``).

The policy:

* The file is a zip archive as torch writes it, checked on its central directory before torch
  reads a byte: at most ``MAX_ENTRIES`` entries, every entry stored uncompressed
  (``torch.save`` and ``torch.export.save`` never compress, so the compression ratio is 1) and
  the entries' declared sizes together no larger than the file. Reading the archive therefore
  never allocates much more than the file's size: a 2 MB file cannot inflate a 2 GiB
  ``data.pkl``. Every entry must match its CRC-32 (torch checks none, so a damaged weight
  would load silently). Only regular files are opened (a FIFO would block). A legacy
  (non-zip) torch file is one pickle: it opens only when trusted.
* Data is unpickled by torch's weights-only unpickler (tensors, containers, plain values).
* A ``.pt2`` program is inspected before ``torch.export.load`` sees it: every entry must be one
  a plain program consists of (program JSON, raw weight and constant bytes, weights-only
  sample inputs). Pickled weights or constants, pickled objects and AOTInductor native code are
  refused naming the entry, and every ``torch.load`` inside ``torch.export.load`` is forced
  weights-only as well (torch's own ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` switch).

Every refusal is a one-line :class:`TorchFileError` naming the file and the entry.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import zipfile
from pathlib import Path
from typing import IO, Any, Iterator

import torch

from .errors import CheckpointError, UsageError
from .fileio import regular_file

MAX_ENTRIES = 1 << 17  # far above any torch archive (one entry per storage / weight)
TRUST_HINT = "attn2onnx loads it only with --trust-pickle (unpickling can run code)"

# Entries of a plain torch.export program, relative to the archive's root folder.
_PROGRAM_ENTRIES = re.compile(
    r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id|extra/[^/]+|models/[^/]+\.json"
    r"|data/weights/[^/]+_weights_config\.json|data/weights/weight_[^/]+"
    r"|data/constants/[^/]+_constants_config\.json|data/constants/tensor_[^/]+|data/sample_inputs/[^/]+\.pt"
)
_WHY_REFUSED = (
    ("data/aotinductor/", "AOTInductor native code, which runs when loaded"),
    ("data/constants/opaque_obj_", "a pickled Python object"),
    ("data/constants/custom_obj_", "a pickled TorchScript object"),
)

_NOT_PLAIN = "not part of a plain torch.export program"


class TorchFileError(CheckpointError):
    """A torch file refused by the loading policy; ``reason`` is the message without the path."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.reason = reason


def check_archive(source: str | os.PathLike | IO[bytes], size: int, name: str) -> dict[str, zipfile.ZipInfo]:
    """The entries of the torch zip archive ``source`` (``size`` bytes, called ``name`` in
    errors), keyed by their names below the root folder as torch's reader names them; refuses
    (TorchFileError) an archive whose central directory declares more than the file holds, or
    whose entries fail their CRC-32 (torch's reader checks none: damaged weight bytes would
    load silently)."""
    try:
        with zipfile.ZipFile(source) as archive:
            infos = archive.infolist()
            _check_sizes(infos, size, name)
            _check_crcs(archive, name)
    except TorchFileError:
        raise
    except (zipfile.BadZipFile, ValueError, EOFError) as e:
        raise TorchFileError(name, f"not a PyTorch file (damaged zip archive: {e})") from None
    root = infos[0].filename.split("/", 1)[0] + "/" if infos else ""
    return {info.filename[len(root) :] if info.filename.startswith(root) else info.filename: info for info in infos}


def _check_sizes(infos: list[zipfile.ZipInfo], size: int, name: str) -> None:
    """Entries few, stored and within the file: reading them never allocates more than it holds."""
    if len(infos) > MAX_ENTRIES:
        raise TorchFileError(name, f"{len(infos):,} zip entries, more than a torch file has ({MAX_ENTRIES:,})")
    total = 0
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise TorchFileError(
                name,
                f"entry {info.filename!r} is compressed, {info.compress_size:,} bytes "
                f"declaring {info.file_size:,}; torch writes entries uncompressed, "
                "so attn2onnx does not inflate it",
            )
        total += info.file_size
        if info.header_offset + info.file_size > size or total > size:
            raise TorchFileError(
                name,
                f"entry {info.filename!r} declares more data ({total:,} bytes so far) "
                f"than the {size:,}-byte file holds",
            )


def _check_crcs(archive: zipfile.ZipFile, name: str) -> None:
    """Every entry read through and matched against its CRC-32 and local header (about the cost
    of reading the file once more, from the page cache: ~0.1 s per 100 MB)."""
    bad = archive.testzip()
    if bad is not None:
        raise TorchFileError(name, f"damaged file: entry {bad!r} fails its CRC-32 check")


def _check_file(path: Path, *, trust_pickle: bool) -> bool:
    """Whether ``path`` is a zip archive (then checked); a legacy torch file only when trusted."""
    regular_file(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):
        check_archive(path, path.stat().st_size, str(path))
        return True
    if trust_pickle:
        return False
    if not head:
        raise TorchFileError(path, "not a PyTorch file (empty)")
    if head.startswith(b"\x80"):
        raise TorchFileError(path, f"a legacy torch file or a plain pickle, not a zip archive; {TRUST_HINT}")
    raise TorchFileError(path, "not a PyTorch file (not a zip archive)")


def load_weights_only(path: str | os.PathLike) -> Any:
    """The data in the torch file ``path``, unpickled by torch's weights-only unpickler after
    the archive checks. Unpickling errors (pickle.UnpicklingError for a pickled object, ...)
    are the caller's to word."""
    path = Path(path)
    _check_file(path, trust_pickle=False)
    return torch.load(path, map_location="cpu", weights_only=True)


def load_pickled(path: str | os.PathLike) -> Any:
    """The object pickled in the torch file ``path``, fully unpickled: for trusted files only.
    Bytes that do not unpickle (a damaged or foreign file fails in many ways) are a one-line
    TorchFileError."""
    path = Path(path)
    _check_file(path, trust_pickle=True)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - pickle, torch and the unpickled classes raise anything
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise TorchFileError(path, f"cannot unpickle it ({type(e).__name__}: {first})") from None


def load_program(path: str | os.PathLike, *, trust_pickle: bool = False) -> torch.export.ExportedProgram:
    """The torch.export program in ``path``. Untrusted, it must be a plain program (see the
    module docstring), and torch reads it weights-only."""
    path = regular_file(path)
    entries = check_archive(path, path.stat().st_size, str(path))
    if trust_pickle:
        return torch.export.load(path)
    _check_program(path, entries)
    with _weights_only_torch_load():
        return torch.export.load(path)


# Libraries whose classes programs carry as pytree nodes (a Hugging Face model's ModelOutput),
# registered with torch when the library's module is imported. Only these are imported for a
# program: a module named by a file is never imported otherwise (that would run code it chose).
PYTREE_LIBRARIES = ("transformers",)
_NOT_REGISTERED = re.compile(r"Deserializing ([\w.]+)\.(\w+) in pytree is not registered")


def register_pytree_library(error: BaseException) -> bool:
    """Import the installed library module that registers the pytree node ``error`` names (torch:
    "Deserializing transformers.modeling_outputs.CausalLMOutputWithPast in pytree is not
    registered", logged by torch.export.load before its vaguer error), so loading can be tried
    again; False when it names no allowed library's. A
    library that is not installed is a UsageError naming the extra to install."""
    import importlib

    match = _NOT_REGISTERED.search(str(error))
    if match is None or match.group(1).split(".")[0] not in PYTREE_LIBRARIES:
        return False
    module = match.group(1)
    try:
        importlib.import_module(module)
    except ImportError:
        raise UsageError(
            f"the program's outputs are {module}.{match.group(2)}: install {module.split('.')[0]} "
            "to read it (pip install attn2onnx[hf])"
        ) from None
    return True


def _check_program(path: Path, entries: dict[str, zipfile.ZipInfo]) -> None:
    """Refuse a program archive holding an entry that would need an unpickle or native code
    (entries were bounded by the archive checks, so reading them is cheap)."""
    with zipfile.ZipFile(path) as archive:
        for name, info in entries.items():
            if not _PROGRAM_ENTRIES.fullmatch(name):
                why = next((why for prefix, why in _WHY_REFUSED if name.startswith(prefix)), _NOT_PLAIN)
                raise TorchFileError(path, f"entry {name!r} is {why}; {TRUST_HINT}")
            if name.endswith(("_weights_config.json", "_constants_config.json")):
                _check_payload_config(path, name, archive.read(info))
            elif name.startswith("data/sample_inputs/") and info.file_size:  # empty: saved without any
                _check_sample_inputs(path, name, archive.read(info))


def _check_payload_config(path: Path, name: str, data: bytes) -> None:
    """Weights and constants must be raw tensor bytes: none pickled, no object constants."""
    folder = name.rsplit("/", 1)[0]
    for fqn, meta in _payload_config(path, name, data).items():
        entry = f"{folder}/{meta.get('path_name')}"
        if meta.get("use_pickle") or (folder == "data/constants" and not entry.startswith("data/constants/tensor_")):
            raise TorchFileError(path, f"entry {entry!r} ({fqn}) is pickled; {TRUST_HINT}")


def _check_sample_inputs(path: Path, name: str, data: bytes) -> None:
    """Sample inputs are a torch.save archive inside the archive: checked like any torch file,
    and readable by the weights-only unpickler (torch falls back to a full unpickle otherwise)."""
    check_archive(io.BytesIO(data), len(data), f"{path} entry {name!r}")
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - anything the weights-only unpickler refuses
        first = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise TorchFileError(path, f"entry {name!r} needs a full unpickle ({first}); {TRUST_HINT}") from None


def _payload_config(path: Path, name: str, data: bytes) -> dict[str, dict[str, Any]]:
    """The ``{fqn: payload meta}`` map of a weights / constants config entry."""
    try:
        config = json.loads(data)["config"]
        if isinstance(config, dict) and all(isinstance(meta, dict) for meta in config.values()):
            return config
    except (ValueError, KeyError, TypeError):
        pass
    raise TorchFileError(path, f"entry {name!r} is not a torch.export payload config")


@contextlib.contextmanager
def _weights_only_torch_load() -> Iterator[None]:
    """Force every ``torch.load`` inside the block weights-only, whatever its call says."""
    keys = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    saved = {key: os.environ.pop(key, None) for key in keys}
    os.environ[keys[0]] = "1"
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value


__all__ = ["MAX_ENTRIES", "TorchFileError", "check_archive", "load_pickled", "load_program", "load_weights_only"]
