"""Hugging Face transformers folders (``save_pretrained``: config.json + safetensors) as model sources.

The folder's model is built by the installed transformers from its config (the class its
``architectures`` names, else the base model), its weights read from safetensors only (never a
pickled ``.bin``: unpickling runs code), and its own modeling code (``auto_map``, ``*.py``) runs
only with ``trust_remote_code``. The model is wrapped as a plain ``forward(*tensors)`` whose
inputs are those an exporter of this architecture takes (Optimum's names): ``input_ids``,
``attention_mask`` (int64, 1 = real token; padding is checked) and, for decoders that take them,
``position_ids``; ``pixel_values`` for an image model. The output is the head's ``logits``, or
the base model's ``last_hidden_state``. transformers is an optional extra (``attn2onnx[hf]``).
"""

from __future__ import annotations

import contextlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import UsageError
from ..io_spec import InputSpec

CONFIG_FILE = "config.json"
INSTALL_HINT = "pip install attn2onnx[hf]"
# Weights a folder may hold in pickled form (read by unpickling, which runs code): refused.
PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
# Head class name endings -> whether the model is a causal decoder (left padding, decode);
# any other class gives its first output (a base model's last_hidden_state).
CAUSAL_HEADS = ("ForCausalLM", "LMHeadModel")
LOGIT_HEADS = (*CAUSAL_HEADS, "ForMaskedLM", "ForSequenceClassification", "ForImageClassification")
# Auto classes for a folder with its own code, by head ending (auto_map names the code per Auto class).
AUTO_CLASSES = {
    "ForCausalLM": "AutoModelForCausalLM",
    "LMHeadModel": "AutoModelForCausalLM",
    "ForMaskedLM": "AutoModelForMaskedLM",
    "ForSequenceClassification": "AutoModelForSequenceClassification",
    "ForImageClassification": "AutoModelForImageClassification",
}


def read_config(folder: Path) -> dict[str, Any]:
    """The folder's config.json as a dict ({} when absent); unreadable JSON is a UsageError."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: not a JSON object")
    return raw


def require_transformers() -> Any:
    """The transformers module; a one-line UsageError with the install command when it is missing."""
    try:
        import transformers
    except ImportError:
        raise UsageError(f"a transformers folder needs the transformers package: {INSTALL_HINT}") from None
    return transformers


def check_folder(folder: Path, config: dict[str, Any], trust_remote_code: bool) -> None:
    """Refuse, in one line, a folder without safetensors weights (pickled ones named) and a
    folder shipping its own code without ``trust_remote_code``."""
    safetensors = list(folder.glob("*.safetensors")) or list(folder.glob("*.safetensors.index.json"))
    if not safetensors:
        pickled = sorted(p.name for pattern in PICKLED_WEIGHTS for p in folder.glob(pattern))
        if pickled:
            raise UsageError(
                f"{folder}: weights {pickled[0]} are pickled (loading runs code); attn2onnx reads safetensors "
                "only: save them with save_pretrained(..., safe_serialization=True)"
            )
        raise UsageError(f"{folder}: no weights (*.safetensors) beside config.json")
    code = sorted(p.name for p in folder.glob("*.py"))
    if ("auto_map" in config or code) and not trust_remote_code:
        what = "auto_map in config.json" if "auto_map" in config else ", ".join(code)
        raise UsageError(f"{folder} ships its own modeling code ({what}), which runs only with --trust-remote-code")


@contextlib.contextmanager
def _quiet_transformers(transformers: Any) -> Iterator[None]:
    """transformers' warnings and progress bars off the terminal while the folder loads (the
    CLI's output is its own lines)."""
    logging = transformers.utils.logging
    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _model_class(transformers: Any, folder: Path, architecture: str | None, remote: bool) -> Any:
    """The class to build: the folder's own code through the Auto class of its head (with
    ``remote``), else the transformers class its ``architectures`` names, else AutoModel."""
    if remote:
        ending = next((e for e in AUTO_CLASSES if architecture and architecture.endswith(e)), None)
        return getattr(transformers, AUTO_CLASSES[ending] if ending else "AutoModel")
    if architecture and isinstance(getattr(transformers, architecture, None), type):
        return getattr(transformers, architecture)
    return transformers.AutoModel


def load_model(folder: Path, *, trust_remote_code: bool = False, attn_implementation: str | None = None) -> nn.Module:
    """The folder's transformers model (float32, eval), built by the installed transformers.
    ``attn_implementation``: ``eager``, ``sdpa`` (transformers' default where supported) or None."""
    transformers = require_transformers()
    config = read_config(folder)
    check_folder(folder, config, trust_remote_code)
    architectures = config.get("architectures") or [None]
    with _quiet_transformers(transformers):
        try:
            cfg = transformers.AutoConfig.from_pretrained(
                folder, trust_remote_code=trust_remote_code, local_files_only=True
            )
        except (ValueError, KeyError, OSError) as e:
            raise UsageError(
                f"{folder}: model_type {config.get('model_type')!r} is no DCFormer release folder ('dcformer') and "
                f"transformers {transformers.__version__} cannot read its config ({_first_line(e)})"
            ) from None
        if getattr(cfg, "is_encoder_decoder", False) and not str(architectures[0]).endswith("EncoderModel"):
            raise UsageError(
                f"{folder}: {architectures[0]} is an encoder-decoder; attn2onnx exports its encoder "
                "(save it as its EncoderModel class, e.g. T5EncoderModel)"
            )
        cls = _model_class(transformers, folder, architectures[0], trust_remote_code and "auto_map" in config)
        try:
            model = cls.from_pretrained(
                folder,
                config=cfg,
                use_safetensors=True,
                local_files_only=True,
                trust_remote_code=trust_remote_code,
                attn_implementation=attn_implementation,
                dtype=torch.float32,
            )
        except (ValueError, KeyError, OSError, RuntimeError, ImportError) as e:
            raise UsageError(f"{folder}: transformers cannot build {cls.__name__} from it ({_first_line(e)})") from None
    return model.eval()


def is_causal(model: nn.Module) -> bool:
    """True for a causal LM head (a decoder: left-padded batches, decode graphs)."""
    return type(model).__name__.endswith(CAUSAL_HEADS)


class TransformersCall(nn.Module):
    """A transformers model called with tensors in the order of ``names`` (its keyword inputs),
    without a cache, giving one tensor: its ``logits`` where it has a head, else its first
    output (``last_hidden_state``). Built by :func:`transformers_call`, whose subclass gives
    ``forward`` a signature naming the inputs (what torch.export binds dynamic dims by)."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.names = names
        self.no_cache = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}

    def decode_lm(self) -> nn.Module:
        """The model as :mod:`attn2onnx.importers.transformers_decode` exports decode graphs of
        it (what ``--decode`` takes); a one-line UsageError for a model that is no causal LM."""
        from .transformers_decode import TransformersLM

        if not is_causal(self.model):
            raise UsageError(f"--decode needs a causal LM; this folder holds a {type(self.model).__name__}")
        return TransformersLM(self.model)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        out = self.model(**dict(zip(self.names, inputs)), **self.no_cache, return_dict=True)
        return out.logits if "logits" in out else out[0]


def transformers_call(model: nn.Module, names: list[str]) -> TransformersCall:
    """:class:`TransformersCall` of ``model`` whose ``forward`` signature is ``names``."""
    parameter = inspect.Parameter.POSITIONAL_OR_KEYWORD
    signature = inspect.Signature([inspect.Parameter(n, parameter) for n in ["self", *names]])

    def forward(self: TransformersCall, *inputs: torch.Tensor) -> torch.Tensor:
        return TransformersCall.forward(self, *inputs)

    forward.__signature__ = signature  # type: ignore[attr-defined]  (read by inspect.signature)
    return type("TransformersCall", (TransformersCall,), {"forward": forward})(model, names)


@dataclass
class FolderModel:
    """What :func:`folder_inputs` makes of a loaded model: the call, its input specs, output
    names and the longest sequence it takes (None: unbounded or unknown)."""

    call: TransformersCall
    specs: list[InputSpec]
    output_names: list[str]
    max_seq: int | None


def _max_seq(model: nn.Module) -> int | None:
    """The longest sequence of learned absolute positions (``max_position_embeddings`` /
    ``n_positions``, less RoBERTa's offset of padding_idx + 1); None for relative / rotary
    positions, which take any length."""
    config = model.config
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    has_table = any(
        isinstance(m, nn.Embedding) and ("position" in name or name.endswith("wpe"))
        for name, m in model.named_modules()
    )
    if not limit or not has_table:
        return None
    base = getattr(model, model.base_model_prefix, model)
    offset = getattr(getattr(base, "embeddings", None), "padding_idx", None)
    return limit - (offset + 1 if isinstance(offset, int) else 0)


def folder_inputs(model: nn.Module) -> FolderModel:
    """The inputs ``model`` takes, as an exporter of its architecture gives them: pixel_values
    [batch, C, H, W] for an image model; else input_ids and attention_mask, and position_ids
    for a causal decoder whose forward takes them."""
    config = model.config
    params = inspect.signature(model.forward).parameters
    if "input_ids" not in params and "pixel_values" in params:
        side = config.image_size
        specs = [InputSpec("pixel_values", ("batch", config.num_channels, side, side), "float")]
    else:
        vocab = getattr(config, "vocab_size", None) or config.get_text_config().vocab_size
        specs = [InputSpec("input_ids", ("batch", "seq"), "ids", vocab)]
        if "attention_mask" in params:
            specs.append(InputSpec("attention_mask", ("batch", "seq"), "int_mask"))
        if is_causal(model) and "position_ids" in params:
            specs.append(InputSpec("position_ids", ("batch", "seq"), "positions"))
    output = "logits" if type(model).__name__.endswith(LOGIT_HEADS) else "last_hidden_state"
    max_seq = None if specs[0].name == "pixel_values" else _max_seq(model)
    return FolderModel(transformers_call(model, [s.name for s in specs]), specs, [output], max_seq)


def is_transformers_folder(folder: Path) -> bool:
    """A folder whose config.json names a model_type other than DCFormer's release (which
    :mod:`attn2onnx.importers.dcformer` reads)."""
    from .dcformer import MODEL_TYPE

    return read_config(folder).get("model_type", MODEL_TYPE) != MODEL_TYPE
