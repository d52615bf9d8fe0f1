"""Quality metrics: agreement with sacrebleu / rouge-score / nltk, reference-shape checks."""

import math

import numpy as np
import pytest
import sacrebleu
from nltk.translate.gleu_score import corpus_gleu
from rouge_score.rouge_scorer import RougeScorer

from llmsample.metrics import bleu, bootstrap_ci, google_bleu, rouge

HYPS = ["the cat sat on the mat", "a quick brown fox jumps", "hello there world"]
REFS2 = [
    ["the cat sat on a mat", "a cat was sitting on the mat"],
    ["the quick brown fox jumped", "a fast brown fox jumps"],
    ["hello world", "hello there big world"],
]


def test_bleu_equals_sacrebleu_with_transposed_streams():
    streams = [[r[0] for r in REFS2], [r[1] for r in REFS2]]
    expected = sacrebleu.corpus_bleu(HYPS, streams)
    got = bleu(HYPS, REFS2)
    assert got["score"] == expected.score
    assert got["bp"] == expected.bp and got["precisions"] == list(expected.precisions)
    assert got["signature"].startswith("nrefs:2|case:mixed|eff:no|tok:13a")
    assert 0 < got["score"] < 100


def test_sentence_bleu_equals_sacrebleu_effective_order():
    got = bleu(HYPS, REFS2)
    expected = [
        sacrebleu.sentence_bleu(h, r, use_effective_order=True).score for h, r in zip(HYPS, REFS2)
    ]
    assert got["sentence_scores"] == expected
    assert got["sentence_mean"] == pytest.approx(np.mean(expected))
    # effective order: a 2-token exact match scores 100, not 0 for missing 3/4-grams
    assert bleu(["hello world"], [["hello world"]])["sentence_scores"] == [pytest.approx(100.0)]


def test_flat_reference_list_raises():
    with pytest.raises(ValueError, match="flat list of strings"):
        bleu(HYPS, [r[0] for r in REFS2])
    with pytest.raises(ValueError, match="flat list of strings"):
        rouge(HYPS, [r[0] for r in REFS2])
    with pytest.raises(ValueError, match="flat list of strings"):
        google_bleu(HYPS, [r[0] for r in REFS2])


def test_other_bad_shapes_raise():
    streams = [[r[0] for r in REFS2]]  # sacrebleu's layout: 1 stream for 3 hypotheses
    with pytest.raises(ValueError, match="1 reference lists for 3 hypotheses"):
        bleu(HYPS, streams)
    with pytest.raises(ValueError, match="no reference"):
        bleu(["a b"], [[]])
    with pytest.raises(ValueError, match="hypotheses must be a list of strings"):
        bleu("a b", [["a b"]])
    with pytest.raises(ValueError, match="empty"):
        bleu([], [])
    with pytest.raises(ValueError, match=r"references\[0\] is not a list of strings"):
        bleu(["a b"], [[1]])


def test_ragged_references():
    hyps = ["the cat", "a dog runs fast"]
    ragged = [["the cat sat on the mat"], ["a dog runs fast", "a dog runs fast"]]
    uniform = [["the cat sat on the mat"], ["a dog runs fast"]]
    got = bleu(hyps, ragged)
    assert got["signature"].startswith("nrefs:var|")
    # a duplicated reference changes nothing, so ragged == uniform
    assert got["score"] == pytest.approx(bleu(hyps, uniform)["score"])
    assert got["ref_len"] == 6 + 4
    # padding with "" instead of None would add a length-0 reference and change BP
    padded = sacrebleu.corpus_bleu(hyps, [[r[0] for r in ragged], ["", "a dog runs fast"]])
    assert padded.score != pytest.approx(got["score"])


def test_rouge_equals_rouge_score_max_over_refs_plain_mean():
    scorer = RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    got = rouge(HYPS, REFS2)
    for key in ("rouge1", "rouge2", "rougeL"):
        per = [max(scorer.score(r, h)[key].fmeasure for r in refs) for h, refs in zip(HYPS, REFS2)]
        assert got["per_hypothesis"][key] == per
        assert got[key] == pytest.approx(sum(per) / len(per))


def test_rouge_hand_value_and_stemming():
    # "the cat" vs "the cat sat": P = 1, R = 2/3, F = 0.8
    assert rouge(["the cat"], [["the cat sat"]])["rouge1"] == pytest.approx(0.8)
    assert rouge(["cats running"], [["cat runs"]])["rouge1"] == pytest.approx(1.0)  # stemmer


def test_google_bleu_hand_values_and_nltk():
    # lowercased: hyp {a, b, a b} (3), ref {a, b, c, a b, b c, a b c} (6), 3 matches -> 3/6
    assert google_bleu(["A B"], [["a b c"]])["google_bleu"] == pytest.approx(0.5)
    assert google_bleu(["the cat sat"], [["The cat sat"]])["google_bleu"] == 1.0
    got = google_bleu(HYPS, REFS2)
    toks = [[r.lower().split() for r in rs] for rs in REFS2]
    assert got["google_bleu"] == corpus_gleu(toks, [h.split() for h in HYPS])
    assert len(got["sentence_scores"]) == 3 and all(0 <= s <= 1 for s in got["sentence_scores"])


def test_bootstrap_ci_hand_values():
    assert bootstrap_ci([3.0, 3.0, 3.0]) == (3.0, 3.0)
    # mean of 2 draws from {0, 1}: 0, 0.5, 1 w.p. 1/4, 1/2, 1/4 -> 95% CI (0, 1)
    assert bootstrap_ci([0.0, 1.0], n_boot=4000) == (0.0, 1.0)
    x = np.random.default_rng(1).normal(5.0, 1.0, size=400)
    low, high = bootstrap_ci(x)
    assert low < x.mean() < high and high - low == pytest.approx(2 * 1.96 / 20, rel=0.2)
    assert bootstrap_ci(x, seed=3) == bootstrap_ci(x, seed=3)
    lo_med, hi_med = bootstrap_ci(x, stat=np.median, n_boot=200)
    assert lo_med < np.median(x) < hi_med


def test_bootstrap_ci_rejects_bad_input():
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="alpha"):
        bootstrap_ci([1.0], alpha=1.5)
    assert math.isfinite(bootstrap_ci([1.0, 2.0], n_boot=1)[0])
