"""Load a model and tokenizer by name: the embedded model, a local folder, or the hub.

    model, tok = llmsample.load_model("shakespeare-tiny")          # ships in the package
    model, tok = llmsample.load_model("gpt2")                       # hub (needs network)
    model, tok = llmsample.load_model("gpt2", adapter="out/lora")   # + a peft adapter

Names in :data:`EMBEDDED` resolve to folders inside the installed package; anything
else goes to ``from_pretrained`` unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch

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
    adapter: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
):
    """Return ``(model, tokenizer)`` in eval mode, with a pad token set (EOS if none).

    ``dtype=None`` loads the embedded fp16 weights as fp32 on CPU (fp16 matmuls are
    slow there) and keeps the stored dtype elsewhere.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = embedded_path(name)
    if path is not None and not (path / "config.json").exists():
        raise FileNotFoundError(
            f"embedded model {name!r} is missing from {path}; reinstall llmsample, or "
            "rebuild it with `python recipes/pretrain_tiny_lm.py`"
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
            f"not a local folder, and not loadable from the Hugging Face hub ({reason})"
        ) from None
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer
