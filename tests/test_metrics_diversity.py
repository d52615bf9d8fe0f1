"""Diversity metrics: hand values on tiny groups, sacrebleu agreement, properties."""

import ast
import math
from pathlib import Path

import numpy as np
import pytest
import sacrebleu
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llmsample.metrics as M
from llmsample.metrics import (
    distinct_n,
    diversity_report,
    ngram_entropy,
    self_bleu,
    unique_ratio,
    vendi_score,
)
from llmsample.metrics.diversity import cosine_diversity

GROUPS = [["a b c", "a b d"], ["x y", "x y"]]


def test_distinct_n_hand_values():
    d1 = distinct_n(GROUPS, 1)
    assert d1["per_prompt"] == [4 / 6, 2 / 4]  # a b c a b d; x y x y
    assert d1["mean"] == pytest.approx((4 / 6 + 2 / 4) / 2)
    assert distinct_n(GROUPS, 2)["per_prompt"] == [3 / 4, 1 / 2]  # ab bc ab bd; xy xy
    d3 = distinct_n(GROUPS, 3)
    assert d3["per_prompt"] == [1.0, None]  # group 1 has no trigram: skipped
    assert d3["mean"] == 1.0
    assert distinct_n([["a"]], 2) == {"mean": None, "per_prompt": [None]}


def test_ngram_entropy_hand_values():
    h = ngram_entropy(GROUPS, 1)["per_prompt"]
    # a:2 b:2 c:1 d:1 of 6
    assert h[0] == pytest.approx(-2 * (1 / 3) * math.log(1 / 3) - 2 * (1 / 6) * math.log(1 / 6))
    assert h[1] == pytest.approx(math.log(2))
    assert ngram_entropy([["x x x"]], 1)["per_prompt"] == [0.0]
    assert ngram_entropy([["p q r s"]], 2)["per_prompt"] == [pytest.approx(math.log(3))]


def test_unique_ratio_hand_values():
    r = unique_ratio([["a", "a", "b"], ["c"], []])
    assert r["per_prompt"] == [2 / 3, 1.0, None]
    assert r["mean"] == pytest.approx((2 / 3 + 1) / 2)


def test_self_bleu_identical_disjoint_and_singletons():
    same = self_bleu([["the cat sat on the mat"] * 3])
    assert same["mean"] == pytest.approx(100.0)
    disjoint = self_bleu([["alpha beta gamma", "delta epsilon zeta", "eta theta iota"]])
    assert disjoint["mean"] == 0.0
    mixed = self_bleu([["solo"], ["p q r", "p q r"]])
    assert mixed["per_prompt"][0] is None and mixed["mean"] == pytest.approx(100.0)


def test_self_bleu_equals_sacrebleu_leave_one_out():
    g = ["the cat sat on the mat", "the cat lay on a mat", "a dog sat on the rug"]
    expected = np.mean([sacrebleu.sentence_bleu(g[i], g[:i] + g[i + 1 :]).score for i in range(3)])
    assert self_bleu([g])["per_prompt"] == [pytest.approx(expected, abs=1e-12)]
    assert 0 < expected < 100


def test_vendi_identical_orthogonal_and_two_point():
    assert vendi_score([["a b", "a b", "a b"]])["mean"] == pytest.approx(1.0)
    # disjoint vocabularies: orthogonal n-gram vectors -> Vendi = n
    assert vendi_score([["a", "b c", "d e f", "g"]])["mean"] == pytest.approx(4.0)
    assert vendi_score([["q"] * 5], embed=[torch.eye(5)])["mean"] == pytest.approx(5.0)
    # two unit vectors with cosine c: eigenvalues of K/2 are (1 +- c)/2
    c = 0.6
    lam = np.array([(1 + c) / 2, (1 - c) / 2])
    expected = math.exp(-(lam * np.log(lam)).sum())
    emb = np.array([[1.0, 0.0], [c, math.sqrt(1 - c**2)]])
    assert vendi_score([["x", "y"]], embed=[emb])["mean"] == pytest.approx(expected)
    # a callable embedder is called on each group's texts
    onehot = lambda texts: np.eye(len(texts))  # noqa: E731
    assert vendi_score([["u", "v", "w"]], embed=onehot)["mean"] == pytest.approx(3.0)


def test_vendi_empty_texts_and_bad_embeddings():
    assert vendi_score([["", "", "a b"]])["mean"] == pytest.approx(
        math.exp(-(2 / 3) * math.log(2 / 3) - (1 / 3) * math.log(1 / 3))
    )
    with pytest.raises(ValueError, match="zero vector"):
        vendi_score([["a", "b"]], embed=[np.array([[1.0, 0.0], [0.0, 0.0]])])
    with pytest.raises(ValueError, match="expected"):
        vendi_score([["a", "b"]], embed=[np.eye(3)])


def test_cosine_diversity():
    assert cosine_diversity(np.ones((3, 4))) == pytest.approx(0.0)
    assert cosine_diversity(np.eye(3)) == pytest.approx(1.0)
    assert cosine_diversity(np.eye(3)[:1]) is None


def test_diversity_report_matches_functions():
    rep = diversity_report(GROUPS)
    assert rep["distinct_2"] == distinct_n(GROUPS, 2)["mean"]
    assert rep["entropy_1"] == ngram_entropy(GROUPS, 1)["mean"]
    assert rep["self_bleu"] == self_bleu(GROUPS)["mean"]
    assert rep["unique_ratio"] == 0.75 and rep["vendi_ngram"] == vendi_score(GROUPS)["mean"]
    assert rep["per_prompt"]["distinct_3"] == [1.0, None]
    assert "embedding_diversity" not in rep
    calls = []

    def fake(texts):
        calls.append(texts)
        return np.eye(len(texts))

    rep = diversity_report(GROUPS, embedder=fake)
    assert rep["embedding_diversity"] == pytest.approx(1.0)
    assert rep["vendi_embedding"] == pytest.approx(2.0)
    assert calls == [list(g) for g in GROUPS]  # one embedder call per group


def test_groups_shape_is_checked():
    with pytest.raises(ValueError, match="list of strings"):
        distinct_n(["a b", "c d"], 1)  # a flat list of samples, not groups
    with pytest.raises(ValueError, match="n must be"):
        distinct_n(GROUPS, 0)


def test_no_module_level_transformers_import():
    for path in Path(M.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # top-level statements only; lazy imports live in functions
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.split(".")[0] == "transformers" for n in names), path.name


texts = st.text(alphabet="ab c", max_size=10)
groups_st = st.lists(st.lists(texts, min_size=1, max_size=5), min_size=1, max_size=3)


@settings(max_examples=60, deadline=None)
@given(groups_st, st.integers(1, 3))
def test_properties_bounds(groups, n):
    for v in distinct_n(groups, n)["per_prompt"]:
        assert v is None or 0 < v <= 1
    for g, v in zip(groups, ngram_entropy(groups, n)["per_prompt"]):
        total = sum(max(len(t.split()) - n + 1, 0) for t in g)
        assert v is None or -1e-12 <= v <= math.log(total) + 1e-9
    for g, v in zip(groups, vendi_score(groups)["per_prompt"]):
        assert 1 - 1e-9 <= v <= len(g) + 1e-9
        if len(set(g)) == 1:
            assert v == pytest.approx(1.0)
    for v in unique_ratio(groups)["per_prompt"]:
        assert 0 < v <= 1
