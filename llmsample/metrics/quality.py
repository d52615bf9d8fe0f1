"""Quality metrics against references: BLEU, ROUGE, Google-BLEU and a bootstrap CI.

Every function takes ``hypotheses[i]`` (one string) and ``references[i]`` (the LIST of
reference strings of hypothesis i; the count may differ between hypotheses):

    from llmsample.metrics import bleu, rouge, bootstrap_ci
    hyps = ["the cat sat on the mat", "a dog barked"]
    refs = [["the cat sat on the mat", "a cat sat on a mat"], ["the dog barked loudly"]]
    b = bleu(hyps, refs)    # {"score": 79.07, "signature": "nrefs:var|case:mixed|...", ...}
    r = rouge(hyps, refs)   # {"rouge1": 0.786, "rouge2": 0.7, "rougeL": 0.786, ...}
    low, high = bootstrap_ci(b["sentence_scores"])  # CI of the mean sentence BLEU

This is NOT sacrebleu's list-of-streams layout (``[[ref_i for i in hyps]]``); it is
transposed internally. A flat list of strings raises, because sacrebleu would silently
read it as something else and score near 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from sacrebleu.metrics import BLEU

__all__ = ["bleu", "rouge", "google_bleu", "bootstrap_ci"]

_SHAPE = (
    "references must be a list with one entry per hypothesis, each entry a list of "
    "reference strings: references[i] = [ref_1, ref_2, ...] for hypotheses[i]"
)


def _check(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    """Reject anything but hypotheses: list[str], references: list[list[str]] of equal length."""
    if isinstance(hypotheses, str) or not all(isinstance(h, str) for h in hypotheses):
        raise ValueError("hypotheses must be a list of strings")
    if len(hypotheses) == 0:
        raise ValueError("hypotheses is empty")
    if isinstance(references, str) or not isinstance(references, Sequence):
        raise ValueError(f"{_SHAPE}; got {type(references).__name__}")
    if any(isinstance(r, str) for r in references):
        raise ValueError(
            f"{_SHAPE}; got a flat list of strings. Wrap each reference in a list: "
            "[[ref] for ref in references]"
        )
    if len(references) != len(hypotheses):
        raise ValueError(
            f"{_SHAPE}; got {len(references)} reference lists for {len(hypotheses)} "
            "hypotheses (sacrebleu's transposed list-of-streams layout is not accepted)"
        )
    for i, refs in enumerate(references):
        if not isinstance(refs, Sequence) or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"{_SHAPE}; references[{i}] is not a list of strings")
        if len(refs) == 0:
            raise ValueError(f"hypothesis {i} has no reference")


def _streams(references: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """Transpose per-hypothesis references into sacrebleu streams, padding with None.

    sacrebleu drops None entries per segment (variable reference counts, signature
    ``nrefs:var``); an empty string would instead count as a real reference of length 0
    and change the brevity penalty.
    """
    k = max(len(r) for r in references)
    return [[r[j] if j < len(r) else None for r in references] for j in range(k)]


def bleu(
    hypotheses: Sequence[str],
    references: Sequence[Sequence[str]],
    tokenize: str | None = None,
    lowercase: bool = False,
) -> dict:
    """Corpus BLEU (sacrebleu, 0-100) plus sentence BLEU of each hypothesis.

    Sentence BLEU uses ``effective_order=True`` (n-gram orders without matches in short
    sentences are skipped). ``tokenize=None`` is sacrebleu's default (``13a``).
    Returns ``score``, ``signature`` (store it with the number), ``precisions``, ``bp``,
    ``sys_len``, ``ref_len``, ``sentence_scores`` and their ``sentence_mean``.
    """
    _check(hypotheses, references)
    hyps = list(hypotheses)
    corpus = BLEU(tokenize=tokenize, lowercase=lowercase)
    res = corpus.corpus_score(hyps, _streams(references))
    sent = BLEU(tokenize=tokenize, lowercase=lowercase, effective_order=True)
    scores = [sent.sentence_score(h, list(r)).score for h, r in zip(hyps, references)]
    return {
        "score": res.score,
        "signature": str(corpus.get_signature()),
        "precisions": list(res.precisions),
        "bp": res.bp,
        "sys_len": res.sys_len,
        "ref_len": res.ref_len,
        "sentence_scores": scores,
        "sentence_mean": float(np.mean(scores)),
    }


_ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    """ROUGE-1/2/L F1 (rouge-score, Porter stemmer, 0-1), max over each hypothesis's refs.

    The corpus value is the plain mean over hypotheses (not the bootstrap ``mid`` that
    the ``evaluate`` hub wrapper reports). ``per_hypothesis[key]`` holds the F1 values.
    """
    from rouge_score.rouge_scorer import RougeScorer

    _check(hypotheses, references)
    scorer = RougeScorer(list(_ROUGE_TYPES), use_stemmer=True)
    per: dict[str, list[float]] = {k: [] for k in _ROUGE_TYPES}
    for h, refs in zip(hypotheses, references):
        s = scorer.score_multi(list(refs), h)
        for k in _ROUGE_TYPES:
            per[k].append(float(s[k].fmeasure))
    out: dict = {k: float(np.mean(v)) for k, v in per.items()}
    out["per_hypothesis"] = per
    return out


def _words(text: str) -> list[str]:
    return text.lower().split()


def google_bleu(
    hypotheses: Sequence[str],
    references: Sequence[Sequence[str]],
    min_len: int = 1,
    max_len: int = 4,
) -> dict:
    """Google-BLEU (GLEU, Wu et al. 2016) with nltk, 0-1.

    Tokenization: lowercase, then split on whitespace (no punctuation splitting).
    GLEU is min(precision, recall) over all 1..4-grams; the corpus value pools the counts
    (nltk ``corpus_gleu``), ``sentence_scores`` are nltk ``sentence_gleu`` per hypothesis.
    """
    from nltk.translate.gleu_score import corpus_gleu, sentence_gleu

    _check(hypotheses, references)
    hyps = [_words(h) for h in hypotheses]
    refs = [[_words(r) for r in rs] for rs in references]
    sent = [sentence_gleu(r, h, min_len, max_len) for r, h in zip(refs, hyps)]
    return {
        "google_bleu": float(corpus_gleu(refs, hyps, min_len, max_len)),
        "sentence_scores": [float(s) for s in sent],
    }


def bootstrap_ci(
    values: Sequence[float],
    stat: Callable[[np.ndarray], float] = np.mean,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) confidence interval of ``stat(values)``.

    Resamples the values with replacement ``n_boot`` times (seeded, reproducible) and
    returns the alpha/2 and 1 - alpha/2 quantiles of the resampled statistic.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"values must be a non-empty 1-D sequence, got shape {x.shape}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    idx = np.random.default_rng(seed).integers(0, x.size, size=(n_boot, x.size))
    if stat is np.mean:
        stats = x[idx].mean(axis=1)
    else:
        stats = np.array([float(stat(x[row])) for row in idx])
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)
