"""The offline evaluate.Metric wrappers return what the wrapped functions return."""

import pytest

from llmsample.metrics import (
    bleu,
    distinct_n,
    google_bleu,
    ngram_entropy,
    rouge,
    self_bleu,
    unique_ratio,
    vendi_score,
)
from llmsample.metrics.hf import (
    BLEU,
    ROUGE,
    Distinct,
    GoogleBLEU,
    NgramEntropy,
    SelfBLEU,
    UniqueRatio,
    Vendi,
)

HYPS = ["the cat sat on the mat", "a dog barked"]
REFS = [["the cat sat on a mat", "a cat sat on the mat"], ["the dog barked loudly"]]
GROUPS = [["a b c", "a b d", "a b c"], ["x y", "z w"]]


def test_quality_metrics_match_functions():
    assert BLEU().compute(predictions=HYPS, references=REFS) == bleu(HYPS, REFS)
    assert ROUGE().compute(predictions=HYPS, references=REFS) == rouge(HYPS, REFS)
    assert GoogleBLEU().compute(predictions=HYPS, references=REFS) == google_bleu(HYPS, REFS)
    low = BLEU().compute(predictions=HYPS, references=REFS, lowercase=True)
    assert low["signature"] == bleu(HYPS, REFS, lowercase=True)["signature"]
    assert "case:lc" in low["signature"]


def test_diversity_metrics_match_functions():
    def same(metric, fn_result, key):
        assert metric == {key: fn_result["mean"], "per_prompt": fn_result["per_prompt"]}

    same(SelfBLEU().compute(predictions=GROUPS), self_bleu(GROUPS), "self_bleu")
    same(Distinct().compute(predictions=GROUPS, n=2), distinct_n(GROUPS, 2), "distinct_2")
    same(NgramEntropy().compute(predictions=GROUPS), ngram_entropy(GROUPS, 1), "entropy_1")
    same(UniqueRatio().compute(predictions=GROUPS), unique_ratio(GROUPS), "unique_ratio")
    same(Vendi().compute(predictions=GROUPS, ns=(1,)), vendi_score(GROUPS, ns=(1,)), "vendi")
    assert UniqueRatio().compute(predictions=GROUPS)["per_prompt"] == [2 / 3, 1.0]


def test_add_batch_then_compute_accumulates():
    m = Distinct()
    m.add_batch(predictions=GROUPS[:1])
    m.add_batch(predictions=GROUPS[1:])
    assert m.compute(n=1)["per_prompt"] == distinct_n(GROUPS, 1)["per_prompt"]


def test_metric_info_and_shape_errors():
    import llmsample.metrics.hf as hf

    assert [getattr(hf, name).__name__ for name in hf.__all__] == hf.__all__
    names = "bleu rouge google_bleu self_bleu distinct ngram_entropy unique_ratio vendi"
    assert [getattr(hf, n)().name for n in hf.__all__] == [*names.split(), "embedding_diversity"]
    m = BLEU()
    assert m.name == "bleu" and "sacrebleu" in m.description and m.citation
    assert set(m.features) == {"predictions", "references"}
    assert set(SelfBLEU().features) == {"predictions"}
    with pytest.raises(ValueError):  # flat references rejected by the Arrow schema
        BLEU().compute(predictions=HYPS, references=[r[0] for r in REFS])
    with pytest.raises(ValueError):  # diversity needs one list of samples per prompt
        Distinct().compute(predictions=["a b", "c d"])
