"""Diversity of samples, computed per prompt and then averaged over prompts.

Every function takes ``groups[b]``: the samples (strings) drawn for prompt b. The metric
is computed inside each group only (samples of different prompts are never compared)
and the reported ``mean`` is the plain mean of the per-prompt values. A group where the
metric is undefined (too few samples or no n-grams, see each function) gets ``None`` in
``per_prompt`` and is left out of the mean; ``mean`` is ``None`` if every group is.
N-gram metrics split on whitespace and are case-sensitive.

    from llmsample.metrics import distinct_n, diversity_report
    groups = [["a b c", "a b d"], ["x y", "x y"]]
    distinct_n(groups, 1)     # {"mean": 0.5833, "per_prompt": [0.6667, 0.5]}
    diversity_report(groups)  # {"self_bleu": 77.5, "distinct_1": 0.5833, ..., "per_prompt": {...}}

(Group 0 has the unigrams a b c a b d: 4 unique of 6; group 1 has x y x y: 2 of 4.)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
from sacrebleu.metrics import BLEU

__all__ = [
    "self_bleu",
    "distinct_n",
    "ngram_entropy",
    "unique_ratio",
    "vendi_score",
    "diversity_report",
    "check_groups",
    "summarize_per_prompt",
]

Groups = Sequence[Sequence[str]]
Embedder = Callable[[list[str]], "np.ndarray"]


def check_groups(groups: Groups) -> None:
    """Refuse anything but a list of lists of strings (the samples of each prompt)."""
    if isinstance(groups, str) or not isinstance(groups, Sequence):
        raise ValueError("groups must be a list of lists of strings (samples per prompt)")
    for b, g in enumerate(groups):
        if isinstance(g, str) or not all(isinstance(t, str) for t in g):
            raise ValueError(
                f"groups[{b}] must be a list of strings (the samples of prompt {b}); "
                "for a single prompt pass [samples]"
            )


def summarize_per_prompt(per_prompt: list[float | None]) -> dict:
    """``{"mean": mean over the prompts that have a value, "per_prompt": the values}``."""
    vals = [v for v in per_prompt if v is not None]
    return {"mean": float(np.mean(vals)) if vals else None, "per_prompt": per_prompt}


def _ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    toks = text.split()
    return [tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)]


def _group_counts(group: Sequence[str], n: int) -> Counter:
    counts: Counter = Counter()
    for text in group:  # n-grams never cross sample boundaries
        counts.update(_ngrams(text, n))
    return counts


def self_bleu(groups: Groups, tokenize: str | None = None) -> dict:
    """Self-BLEU (0-100, lower = more diverse): each sample scored against the others.

    Per group: the mean over samples i of sacrebleu sentence BLEU (``effective_order=True``)
    of sample i with the other samples of the group as its references. Groups with fewer
    than 2 samples have no references and are skipped (``None``).
    """
    check_groups(groups)
    metric = BLEU(tokenize=tokenize, effective_order=True)
    per: list[float | None] = []
    for g in groups:
        if len(g) < 2:
            per.append(None)
            continue
        scores = [
            metric.sentence_score(g[i], list(g[:i]) + list(g[i + 1 :])).score for i in range(len(g))
        ]
        per.append(float(np.mean(scores)))
    return summarize_per_prompt(per)


def _ngram_stat(groups: Groups, n: int, stat: Callable[[Counter, int], float]) -> dict:
    """``stat(counts, total)`` of each group's pooled n-gram counts, summarized over
    groups; a group without any n-gram (every sample shorter than n tokens) is ``None``."""
    check_groups(groups)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    per: list[float | None] = []
    for g in groups:
        c = _group_counts(g, n)
        total = sum(c.values())
        per.append(stat(c, total) if total else None)
    return summarize_per_prompt(per)


def distinct_n(groups: Groups, n: int = 1) -> dict:
    """Distinct-n: unique n-grams / total n-grams of each group, in [0, 1].

    A group without any n-gram (every sample shorter than n tokens) is skipped (``None``).
    """
    return _ngram_stat(groups, n, lambda c, total: len(c) / total)


def _entropy(c: Counter, total: int) -> float:
    p = np.array(list(c.values()), dtype=np.float64) / total
    return float(-(p * np.log(p)).sum()) + 0.0  # + 0.0 turns -0.0 into 0.0


def ngram_entropy(groups: Groups, n: int = 1) -> dict:
    """Shannon entropy (nats) of each group's empirical n-gram distribution.

    The n-grams of all samples of a group are pooled and counted; entropy is
    -sum p log p with p = count / total. Groups without n-grams are skipped (``None``).
    """
    return _ngram_stat(groups, n, _entropy)


def unique_ratio(groups: Groups) -> dict:
    """Distinct texts / samples of each group (exact string match). Empty groups: ``None``."""
    check_groups(groups)
    return summarize_per_prompt([len(set(g)) / len(g) if len(g) else None for g in groups])


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _ngram_features(group: Sequence[str], ns: Sequence[int]) -> np.ndarray:
    """Count vectors over the group's n-grams of the orders ``ns``.

    A text without any such n-gram gets a private "empty" feature, so empty texts are
    identical to each other and orthogonal to the rest (their cosine is then defined).
    """
    counts = []
    for text in group:
        c = Counter(g for n in ns for g in _ngrams(text, n))
        counts.append(c if c else Counter({("<empty>",): 1}))
    vocab = {g: j for j, g in enumerate({g for c in counts for g in c})}
    feats = np.zeros((len(group), len(vocab)))
    for i, c in enumerate(counts):
        for g, k in c.items():
            feats[i, vocab[g]] = k
    return feats


def _vendi_from_features(x: np.ndarray) -> float:
    """exp(entropy of the eigenvalues of K / n) for the cosine kernel K of the rows of x."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError("an embedding is the zero vector: its cosine similarity is undefined")
    x = x / norms
    n = x.shape[0]
    # K / n = X X^T / n has the same non-zero eigenvalues as X^T X / n; use the smaller.
    gram = (x @ x.T if n <= x.shape[1] else x.T @ x) / n
    lam = np.clip(np.linalg.eigvalsh(gram), 0.0, None)
    lam = lam[lam > 0]
    lam = lam / lam.sum()  # trace(K/n) = 1 up to rounding
    return float(np.exp(-(lam * np.log(lam)).sum()))


def vendi_score(
    groups: Groups,
    embed: Embedder | Sequence | None = None,
    ns: Sequence[int] = (1, 2),
) -> dict:
    """Vendi score of each group: exp(Shannon entropy of the eigenvalues of K / n).

    K is the n x n cosine-similarity matrix of the group's samples, so Vendi is 1 when all
    samples are identical and n when they are mutually orthogonal: the effective number of
    distinct samples. ``embed`` picks the vectors:

    - ``None``: count vectors of whitespace n-grams of the orders ``ns`` (no model needed);
    - a callable ``texts -> [n, d]`` array or tensor (e.g. ``llmsample.metrics.embed_texts``);
    - precomputed embeddings, one ``[n_b, d]`` array or tensor per group.

    Empty groups are skipped (``None``).
    """
    check_groups(groups)
    if embed is not None and not callable(embed) and len(embed) != len(groups):
        raise ValueError(f"got {len(embed)} embedding matrices for {len(groups)} groups")
    per: list[float | None] = []
    for b, g in enumerate(groups):
        if not len(g):
            per.append(None)
            continue
        if embed is None:
            x = _ngram_features(g, ns)
        else:
            x = _to_numpy(embed(list(g)) if callable(embed) else embed[b])
            if x.ndim != 2 or x.shape[0] != len(g):
                raise ValueError(f"group {b}: expected [{len(g)}, d] embeddings, got {x.shape}")
        per.append(_vendi_from_features(x))
    return summarize_per_prompt(per)


def cosine_diversity(x) -> float | None:
    """1 - mean cosine similarity over pairs i != j of the rows of ``x`` (None if < 2 rows)."""
    x = _to_numpy(x)
    if x.shape[0] < 2:
        return None
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = x @ x.T
    n = x.shape[0]
    return float(1.0 - (sim.sum() - np.trace(sim)) / (n * (n - 1)))


def diversity_report(groups: Groups, embedder: Embedder | None = None) -> dict:
    """All diversity metrics: their means at top level, per-prompt values under ``per_prompt``.

    Keys: ``self_bleu``, ``distinct_{1,2,3}``, ``entropy_{1,2,3}`` (n-gram entropy, nats),
    ``unique_ratio``, ``vendi_ngram``; with an ``embedder`` (a callable texts -> [n, d],
    e.g. ``llmsample.metrics.embed_texts``) also ``embedding_diversity`` and
    ``vendi_embedding``, both from the same embeddings (the model runs once per group).
    """
    check_groups(groups)
    parts = {"self_bleu": self_bleu(groups)}
    for n in (1, 2, 3):
        parts[f"distinct_{n}"] = distinct_n(groups, n)
    for n in (1, 2, 3):
        parts[f"entropy_{n}"] = ngram_entropy(groups, n)
    parts["unique_ratio"] = unique_ratio(groups)
    parts["vendi_ngram"] = vendi_score(groups)
    if embedder is not None:
        embs = [_to_numpy(embedder(list(g))) if len(g) else np.zeros((0, 1)) for g in groups]
        parts["embedding_diversity"] = summarize_per_prompt([cosine_diversity(e) for e in embs])
        parts["vendi_embedding"] = vendi_score(groups, embed=embs)
    out: dict = {k: v["mean"] for k, v in parts.items()}
    out["per_prompt"] = {k: v["per_prompt"] for k, v in parts.items()}
    return out
