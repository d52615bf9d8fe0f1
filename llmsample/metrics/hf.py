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
    """An evaluate.Metric built locally (no hub script), in memory by default."""

    _description = ""
    _citation = ""
    _features = _GROUP_FEATURES
    _inputs = _GROUP_INPUTS

    def __init__(self, keep_in_memory: bool = True, **kwargs):
        super().__init__(keep_in_memory=keep_in_memory, **kwargs)

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=self._description,
            citation=self._citation,
            inputs_description=self._inputs,
            features=self._features,
        )


class _Quality(_Offline):
    _features = _QUALITY_FEATURES
    _inputs = _QUALITY_INPUTS


class BLEU(_Quality):
    _description = "Corpus BLEU (sacrebleu) with signature, and sentence BLEU (effective order)."
    _citation = "Post, A Call for Clarity in Reporting BLEU Scores, WMT 2018."

    def _compute(self, predictions, references, **kwargs):
        return quality.bleu(predictions, references, **kwargs)


class ROUGE(_Quality):
    _description = "ROUGE-1/2/L F1 (rouge-score, stemmed), plain mean over predictions."
    _citation = "Lin, ROUGE: A Package for Automatic Evaluation of Summaries, 2004."

    def _compute(self, predictions, references):
        return quality.rouge(predictions, references)


class GoogleBLEU(_Quality):
    _description = "Google-BLEU (GLEU, nltk), lowercased whitespace tokens."
    _citation = "Wu et al., Google's Neural Machine Translation System, 2016."

    def _compute(self, predictions, references, **kwargs):
        return quality.google_bleu(predictions, references, **kwargs)


def _named(name: str, res: dict) -> dict:
    return {name: res["mean"], "per_prompt": res["per_prompt"]}


class SelfBLEU(_Offline):
    _description = "Self-BLEU: each sample's sentence BLEU against the rest of its prompt's group."
    _citation = "Zhu et al., Texygen: A Benchmarking Platform for Text Generation Models, 2018."

    def _compute(self, predictions, **kwargs):
        return _named("self_bleu", diversity.self_bleu(predictions, **kwargs))


class Distinct(_Offline):
    _description = "Distinct-n: unique / total whitespace n-grams per prompt (compute(n=...))."
    _citation = "Li et al., A Diversity-Promoting Objective Function for Neural Conversation, 2016."

    def _compute(self, predictions, n: int = 1):
        return _named(f"distinct_{n}", diversity.distinct_n(predictions, n))


class NgramEntropy(_Offline):
    _description = "Shannon entropy (nats) of the n-gram distribution of each prompt's samples."
    _citation = "Zhang et al., Generating Informative and Diverse Conversational Responses, 2018."

    def _compute(self, predictions, n: int = 1):
        return _named(f"entropy_{n}", diversity.ngram_entropy(predictions, n))


class UniqueRatio(_Offline):
    _description = "Distinct texts / samples of each prompt."

    def _compute(self, predictions):
        return _named("unique_ratio", diversity.unique_ratio(predictions))


class Vendi(_Offline):
    _description = "Vendi score (n-gram cosine kernel by default) of each prompt's samples."
    _citation = "Friedman and Dieng, The Vendi Score: A Diversity Evaluation Metric, 2023."

    def _compute(self, predictions, **kwargs):
        return _named("vendi", diversity.vendi_score(predictions, **kwargs))


class EmbeddingDiversity(_Offline):
    _description = "1 - mean pairwise cosine of all-MiniLM-L6-v2 embeddings, per prompt."
    _citation = "Reimers and Gurevych, Sentence-BERT, 2019."

    def _compute(self, predictions, model_name_or_path: str | None = None):
        from llmsample.metrics.embedding import embedding_diversity

        return _named("embedding_diversity", embedding_diversity(predictions, model_name_or_path))
