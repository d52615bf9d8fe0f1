"""``evaluate.Metric`` wrappers of the llmsample metrics that work offline.

The hub metrics (``evaluate.load("bleu")``) download their scripts and fail offline, and
their BLEU/ROUGE conventions differ (flat references, bootstrap ``mid``). These classes
are defined here and instantiated directly; they delegate to ``llmsample.metrics``:

    from llmsample.metrics.hf import BLEU, SelfBLEU
    BLEU().compute(predictions=["the cat sat"], references=[["the cat sat", "a cat sat"]])
    SelfBLEU().compute(predictions=[["a b c", "a b d"], ["x y", "z w"]])  # one group/prompt

Quality metrics take ``predictions`` (strings) and ``references`` (a list of reference
strings per prediction). Diversity metrics take only ``predictions``: one LIST of samples
per prompt. Extra keyword arguments of ``compute`` go to the wrapped function.
Instances default to ``keep_in_memory=True`` (no Arrow cache files on disk).
Importing this module imports ``evaluate``, which itself imports ``transformers``.
"""

from __future__ import annotations

from collections.abc import Callable

import datasets
import evaluate

from llmsample.metrics import diversity, quality

__all__ = [
    "BLEU",
    "ROUGE",
    "GoogleBLEU",
    "SelfBLEU",
    "Distinct",
    "NgramEntropy",
    "UniqueRatio",
    "Vendi",
    "EmbeddingDiversity",
]

_QUALITY_FEATURES = datasets.Features(
    {
        "predictions": datasets.Value("string"),
        "references": datasets.Sequence(datasets.Value("string")),
    }
)
_GROUP_FEATURES = datasets.Features({"predictions": datasets.Sequence(datasets.Value("string"))})
_QUALITY_INPUTS = """
    predictions: list of hypothesis strings.
    references: list of lists of reference strings, references[i] for predictions[i].
"""
_GROUP_INPUTS = """
    predictions: list of lists of strings, the samples of each prompt (diversity is computed
        per prompt, then averaged over prompts).
"""


class _Offline(evaluate.Metric):
    """An evaluate.Metric built locally (no hub script), in memory by default.

    ``compute`` calls ``_fn(predictions, **kwargs)``. A quality metric (``_key`` None)
    returns the function's dict as is; a diversity metric returns
    ``{_key: mean, "per_prompt": [...]}``, with ``{n}`` in ``_key`` filled from the
    ``n=`` keyword (default 1)."""

    _description = ""
    _citation = ""
    _features = _GROUP_FEATURES
    _inputs = _GROUP_INPUTS
    _key: str | None = None
    _fn: Callable[..., dict]  # the wrapped function, set by _metric_class

    def __init__(self, keep_in_memory: bool = True, **kwargs):
        super().__init__(keep_in_memory=keep_in_memory, **kwargs)

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=self._description,
            citation=self._citation,
            inputs_description=self._inputs,
            features=self._features,
        )

    def _compute(self, predictions, **kwargs):
        res = self._fn(predictions, **kwargs)  # quality metrics get references= here
        if self._key is None:
            return res
        key = self._key.format(n=kwargs.get("n", 1))
        return {key: res["mean"], "per_prompt": res["per_prompt"]}


def _embedding_diversity(predictions, model_name_or_path: str | None = None) -> dict:
    from llmsample.metrics.embedding import embedding_diversity  # imports sentence encoders

    return embedding_diversity(predictions, model_name_or_path)


# class name: (wrapped function, result key or None for a quality metric, description,
# citation)
_METRICS = {
    "BLEU": (
        quality.bleu,
        None,
        "Corpus BLEU (sacrebleu) with signature, and sentence BLEU (effective order).",
        "Post, A Call for Clarity in Reporting BLEU Scores, WMT 2018.",
    ),
    "ROUGE": (
        quality.rouge,
        None,
        "ROUGE-1/2/L F1 (rouge-score, stemmed), plain mean over predictions.",
        "Lin, ROUGE: A Package for Automatic Evaluation of Summaries, 2004.",
    ),
    "GoogleBLEU": (
        quality.google_bleu,
        None,
        "Google-BLEU (GLEU, nltk), lowercased whitespace tokens.",
        "Wu et al., Google's Neural Machine Translation System, 2016.",
    ),
    "SelfBLEU": (
        diversity.self_bleu,
        "self_bleu",
        "Self-BLEU: each sample's sentence BLEU against the rest of its prompt's group.",
        "Zhu et al., Texygen: A Benchmarking Platform for Text Generation Models, 2018.",
    ),
    "Distinct": (
        diversity.distinct_n,
        "distinct_{n}",
        "Distinct-n: unique / total whitespace n-grams per prompt (compute(n=...)).",
        "Li et al., A Diversity-Promoting Objective Function for Neural Conversation, 2016.",
    ),
    "NgramEntropy": (
        diversity.ngram_entropy,
        "entropy_{n}",
        "Shannon entropy (nats) of the n-gram distribution of each prompt's samples.",
        "Zhang et al., Generating Informative and Diverse Conversational Responses, 2018.",
    ),
    "UniqueRatio": (
        diversity.unique_ratio,
        "unique_ratio",
        "Distinct texts / samples of each prompt.",
        "",
    ),
    "Vendi": (
        diversity.vendi_score,
        "vendi",
        "Vendi score (n-gram cosine kernel by default) of each prompt's samples.",
        "Friedman and Dieng, The Vendi Score: A Diversity Evaluation Metric, 2023.",
    ),
    "EmbeddingDiversity": (
        _embedding_diversity,
        "embedding_diversity",
        "1 - mean pairwise cosine of all-MiniLM-L6-v2 embeddings, per prompt.",
        "Reimers and Gurevych, Sentence-BERT, 2019.",
    ),
}


def _metric_class(name: str, fn, key: str | None, description: str, citation: str) -> type:
    """The evaluate.Metric subclass ``name`` (its lowercased name is the metric's name)."""
    body = dict(_fn=staticmethod(fn), _key=key, _description=description, _citation=citation)
    if key is None:
        body.update(_features=_QUALITY_FEATURES, _inputs=_QUALITY_INPUTS)
    body.update(__module__=__name__, __qualname__=name, __doc__=description)
    return type(name, (_Offline,), body)


(
    BLEU,
    ROUGE,
    GoogleBLEU,
    SelfBLEU,
    Distinct,
    NgramEntropy,
    UniqueRatio,
    Vendi,
    EmbeddingDiversity,
) = (_metric_class(name, *row) for name, row in _METRICS.items())
