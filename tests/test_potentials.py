"""Built-in potentials on small hand-made particle views, against hand-computed values.

Token ids 0..7 decode (with the conftest tokenizer) to the words "a".."h", joined by
spaces; 8 is EOS. ``PieceTokenizer`` decodes ids by plain concatenation of arbitrary
pieces, for tests that need exact control over the text (case, word boundaries).
"""

import math
import re

import pytest
import regex
import torch
from conftest import EOS, VOCAB, make_model, make_tokenizer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from llmsample import Particles
from llmsample.hf.prompts import encode_prompts
from llmsample.potentials import (
    Classifier,
    Constraint,
    Contains,
    Potential,
    Product,
    Regex,
    Reward,
    SuffixLikelihood,
    Tempered,
    TokenMask,
)
from llmsample.testing import toy_classifier

NINF = -math.inf
TOK = make_tokenizer()


class PieceTokenizer:
    """Decodes token ids by concatenating fixed text pieces (no separators)."""

    def __init__(self, pieces):
        self.pieces = pieces

    def batch_decode(self, seqs, skip_special_tokens=False):
        return ["".join(self.pieces[i] for i in s) for s in seqs]


PIECES = ["love", "ly", " ", "LOVE", "hate", "un", "!", "x", "<eos>"]


def particles(
    rows,
    lengths=None,
    prompts=("a",),
    prompt_index=None,
    tokenizer=TOK,
    eos=(EOS,),
    pad=EOS,
    vocab_size=VOCAB,
    max_new_tokens=16,
):
    """A Particles view of ``rows`` (lists of continuation ids, right padded with ``pad``).

    ``lengths`` defaults to each row's length (EOS included); ``prompt_index`` to 0."""
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    lengths = [len(r) for r in rows] if lengths is None else lengths
    prompt_index = [0] * len(rows) if prompt_index is None else prompt_index
    return Particles(
        tokens,
        torch.tensor(lengths, dtype=torch.long),
        torch.tensor(prompt_index, dtype=torch.long),
        encode_prompts(TOK, list(prompts)),
        tokenizer,
        torch.tensor(list(eos), dtype=torch.long),
        max_new_tokens,
        vocab_size,
    )


def scores(*values):
    return torch.tensor(values, dtype=torch.float64)


def assert_scores(actual, expected):
    assert actual.dtype == torch.float64
    torch.testing.assert_close(actual, expected if torch.is_tensor(expected) else scores(*expected))


# --------------------------------------------------------------------------- Particles view


def test_particles_texts_strip_eos_and_padding():
    x = particles([[0, 1, EOS, 3], [2, 3, 4]], lengths=[3, 2])
    assert x.texts() == ["a b", "c d"]
    assert x.token_lists() == [[0, 1], [2, 3]]
    assert x.step == 4 and x.num_rows == 2


# --------------------------------------------------------------------------- Constraint


def test_constraint_without_prefix_predicate():
    c = Constraint(lambda t: t.startswith("a"))
    x = particles([[0, 1], [1, 0], [0, EOS], [2]])
    assert_scores(c.complete(x), [0.0, NINF, 0.0, NINF])
    assert not c.has_prefix
    assert_scores(c.prefix(x), [0.0, 0.0, 0.0, 0.0])  # uninformative: psi = 1


def test_constraint_with_prefix_predicate():
    c = Constraint(lambda t: t == "a b", prefix_predicate=lambda t: "h" not in t.split())
    x = particles([[0, 1, EOS], [0, 7], [0], [7, 1]], lengths=[3, 2, 1, 2])
    assert c.has_prefix
    assert_scores(c.complete(x), [0.0, NINF, NINF, NINF])
    assert_scores(c.prefix(x), [0.0, NINF, 0.0, NINF])


def test_constraint_on_empty_selection():
    c = Constraint(lambda t: True)
    empty = particles([[0, 1]]).select(torch.tensor([False]))
    assert empty.num_rows == 0
    assert empty.texts() == []
    assert c.complete(empty).shape == (0,)


# --------------------------------------------------------------------------- Regex


def test_regex_search_vs_fullmatch():
    x = particles([[0, 1, 2, 3], [1, 2], [0, 1], [1, 2, EOS]])  # "a b c d", "b c", "a b", "b c"
    search = Regex(r"b c")
    full = Regex(r"b c", mode="fullmatch")
    assert_scores(search.complete(x), [0.0, 0.0, NINF, 0.0])
    assert_scores(full.complete(x), [NINF, 0.0, NINF, 0.0])


def test_regex_search_has_no_prefix_score():
    r = Regex(r"h")
    assert not r.has_prefix
    assert_scores(r.prefix(particles([[0], [7]])), [0.0, 0.0])


def test_regex_fullmatch_prefix_is_partial_match():
    r = Regex(r"a b c( d)?", mode="fullmatch")
    assert r.has_prefix
    # "", "a", "a b", "a b c", "a b c d" can still (or do) fully match; "a c", "b",
    # "a b c d e" and "a b d" cannot be extended to a full match.
    rows = [[], [0], [0, 1], [0, 1, 2], [0, 1, 2, 3], [0, 2], [1], [0, 1, 2, 3, 4], [0, 1, 3]]
    x = particles(rows)
    assert x.texts()[0] == ""
    assert_scores(r.prefix(x), [0.0] * 5 + [NINF] * 4)
    assert_scores(r.complete(x), [NINF, NINF, NINF, 0.0, 0.0] + [NINF] * 4)


def test_regex_flags_and_pieces():
    x = particles([[3, 6], [0], [4]], tokenizer=PieceTokenizer(PIECES))  # "LOVE!", "love", "hate"
    assert_scores(Regex("love").complete(x), [NINF, 0.0, NINF])
    assert_scores(Regex("love", flags=regex.IGNORECASE).complete(x), [0.0, 0.0, NINF])


def test_invalid_regex_mentions_pattern():
    with pytest.raises(ValueError, match=re.escape("'a(b'")):
        Regex("a(b")
    with pytest.raises(ValueError, match="mode"):
        Regex("a", mode="match")


def _byte_level_tokenizer():
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_regex_fullmatch_prefix_mid_character_byte_level():
    tok = _byte_level_tokenizer()
    ids = tok("é", add_special_tokens=False)["input_ids"]
    assert len(ids) == 2  # one character, two byte tokens
    r = Regex("é", mode="fullmatch")
    full = particles([ids], tokenizer=tok, eos=(256,), vocab_size=257)
    assert_scores(r.complete(full), [0.0])  # the completed text matches ...
    half = particles([ids[:1]], tokenizer=tok, eos=(256,), vocab_size=257)
    assert_scores(r.prefix(half), [0.0])  # ... so its prefix must survive


# --------------------------------------------------------------------------- Contains


def test_contains_whole_words_case_insensitive():
    x = particles(
        [[0], [5, 0], [0, 1], [3, 6], [2, 0, 2], [7, 0]],
        tokenizer=PieceTokenizer(PIECES),
    )  # "love", "unlove", "lovely", "LOVE!", " love ", "xlove"
    assert x.texts() == ["love", "unlove", "lovely", "LOVE!", " love ", "xlove"]
    assert_scores(Contains("love").complete(x), [0.0, NINF, NINF, 0.0, 0.0, NINF])
    assert_scores(
        Contains("love", case_sensitive=True).complete(x), [0.0, NINF, NINF, NINF, 0.0, NINF]
    )
    assert_scores(
        Contains("LOVE", case_sensitive=True).complete(x), [NINF] * 3 + [0.0] + [NINF] * 2
    )


def test_contains_multiple_words_needs_all():
    x = particles(
        [[0, 2, 4], [4, 2, 3], [0], [4], [1, 2, 4, 2, 0]], tokenizer=PieceTokenizer(PIECES)
    )  # "love hate", "hate LOVE", "love", "hate", "ly hate love"
    c = Contains("love", "hate")
    assert_scores(c.complete(x), [0.0, 0.0, NINF, NINF, 0.0])
    assert not c.has_prefix
    assert_scores(c.prefix(x), [0.0] * 5)


def test_contains_rejects_empty_words():
    for words in [(), ("",), ("love", " ")]:
        with pytest.raises(ValueError, match="non-empty word"):
            Contains(*words)


def test_contains_escapes_regex_metacharacters():
    x = particles([[6], [7]], tokenizer=PieceTokenizer(PIECES))  # "!", "x"
    assert_scores(Contains(".").complete(x), [NINF, NINF])


# --------------------------------------------------------------------------- TokenMask


def test_token_mask_allowed():
    m = TokenMask(allowed=[0, 1])
    x = particles([[0, 1, 0], [0, 2], [0, EOS], [1], [3, EOS]])
    assert_scores(m.complete(x), [0.0, NINF, 0.0, 0.0, NINF])
    assert m.has_prefix
    assert_scores(m.prefix(x), m.complete(x))


def test_token_mask_banned():
    m = TokenMask(banned=[2, 5])
    x = particles([[0, 1], [2], [EOS], [3, 4, 5], [6, 7, EOS]])
    assert_scores(m.complete(x), [0.0, NINF, 0.0, NINF, 0.0])


def test_token_mask_eos_always_allowed():
    x = particles([[0, EOS], [0, 7]], eos=(7, EOS))  # 7 is an EOS id here
    assert_scores(TokenMask(banned=[7, EOS]).complete(x), [0.0, 0.0])
    assert_scores(TokenMask(allowed=[0]).complete(x), [0.0, 0.0])


def test_token_mask_ignores_positions_beyond_lengths():
    # Row 0 has one real token; the banned 5s after it are padding.
    x = particles([[0, 5, 5], [0, 5, 5]], lengths=[1, 3], pad=5)
    assert_scores(TokenMask(banned=[5]).complete(x), [0.0, NINF])
    assert_scores(TokenMask(allowed=[0]).complete(x), [0.0, NINF])


def test_token_mask_token_scores_shape_and_values():
    m = TokenMask(allowed=[1, 3])
    x = particles([[1, 3], [2, 1]])
    s = m.token_scores(x)
    assert s.shape == (2, VOCAB) and s.dtype == torch.float64
    expected_live = torch.full((VOCAB,), NINF, dtype=torch.float64)
    expected_live[[1, 3, EOS]] = 0.0
    torch.testing.assert_close(s[0], expected_live)
    assert torch.isneginf(s[1]).all()  # the prefix already broke the mask


@pytest.mark.parametrize("mask", [TokenMask(allowed=[1, 3]), TokenMask(banned=[0, 4, 6])])
def test_token_mask_token_scores_match_complete_of_extension(mask):
    rows = [[1, 3], [2, 1], [3, 3], [0, 6]]
    x = particles(rows)
    s = mask.token_scores(x)
    for v in range(VOCAB):
        ext = particles([r + [v] for r in rows])
        torch.testing.assert_close(s[:, v], mask.complete(ext))


def test_token_mask_token_scores_at_step_zero():
    x = particles([[], []])
    assert x.step == 0
    s = TokenMask(banned=[2]).token_scores(x)
    assert s.shape == (2, VOCAB)
    assert torch.isneginf(s[:, 2]).all() and (s[:, [0, 1, 3, 4, 5, 6, 7, 8]] == 0).all()


def test_token_mask_needs_exactly_one_list():
    with pytest.raises(ValueError, match="exactly one"):
        TokenMask()
    with pytest.raises(ValueError, match="exactly one"):
        TokenMask(allowed=[0], banned=[1])


# --------------------------------------------------------------------------- SuffixLikelihood


def _manual_suffix_logp(model, prompt_ids, cont_ids, suffix_ids):
    ids = torch.tensor([prompt_ids + cont_ids + suffix_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    start = len(prompt_ids) + len(cont_ids)
    return sum(float(logp[start + j - 1, s]) for j, s in enumerate(suffix_ids))


SUFFIX_PROMPTS = ["a b c", "d"]
SUFFIX_ROWS = [[1, 2, EOS], [3, 4, 5], [6, EOS, EOS], [0, 0, 7]]
SUFFIX_LENGTHS = [3, 3, 2, 3]
SUFFIX_INDEX = [0, 0, 1, 1]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_suffix_likelihood_equals_teacher_forcing(arch):
    model = make_model(arch)
    x = particles(SUFFIX_ROWS, SUFFIX_LENGTHS, prompts=SUFFIX_PROMPTS, prompt_index=SUFFIX_INDEX)
    pot = SuffixLikelihood(model, TOK, "g h")
    got = pot.complete(x)
    prompt_ids = {0: [0, 1, 2], 1: [3]}
    expected = [
        _manual_suffix_logp(model, prompt_ids[b], toks, [6, 7])
        for b, toks in zip(SUFFIX_INDEX, x.token_lists())
    ]
    assert got.dtype == torch.float64 and got.shape == (4,)
    torch.testing.assert_close(got, scores(*expected), atol=1e-4, rtol=1e-4)
    assert (got < 0).all() and len(set(got.tolist())) == 4
    assert pot.forward_tokens > 0
    assert not pot.has_prefix
    assert_scores(pot.prefix(x), [0.0] * 4)


def test_suffix_likelihood_per_prompt_suffix_and_twist():
    model = make_model("gpt2")
    x = particles(SUFFIX_ROWS, SUFFIX_LENGTHS, prompts=SUFFIX_PROMPTS, prompt_index=SUFFIX_INDEX)
    pot = SuffixLikelihood(model, TOK, ["g h", "a"], as_twist=True)
    prompt_ids = {0: [0, 1, 2], 1: [3]}
    suffix_ids = {0: [6, 7], 1: [0]}
    expected = [
        _manual_suffix_logp(model, prompt_ids[b], toks, suffix_ids[b])
        for b, toks in zip(SUFFIX_INDEX, x.token_lists())
    ]
    torch.testing.assert_close(pot.complete(x), scores(*expected), atol=1e-4, rtol=1e-4)
    assert pot.has_prefix
    torch.testing.assert_close(pot.prefix(x), scores(*expected), atol=1e-4, rtol=1e-4)


def test_suffix_likelihood_empty_suffix_raises():
    pot = SuffixLikelihood(make_model("gpt2"), TOK, ["g", ""])
    x = particles([[0], [1]], prompts=["a", "b"], prompt_index=[0, 1])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        pot.complete(x)


# --------------------------------------------------------------------------- Classifier


@pytest.fixture(scope="module")
def classifier():
    """The toy GPT-2 classifier: labels "neg"/"pos", pad = EOS, head scaled by 20 to spread
    the outputs out."""
    return toy_classifier(seed=0, scale=20.0)


def _manual_class_logp(model, text, label):
    ids = torch.tensor([TOK(text)["input_ids"]])
    with torch.no_grad():
        return float(torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)[label])


def test_classifier_matches_manual_log_softmax(classifier):
    ctok = make_tokenizer(with_pad=True)
    x = particles([[0, 1], [2, 3, 4, EOS], [5], [7, 7, 7]])
    texts = x.texts()
    for label in (0, 1):
        got = Classifier(classifier, ctok, label=label).complete(x)
        expected = scores(*[_manual_class_logp(classifier, t, label) for t in texts])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    pos = Classifier(classifier, ctok, label="pos").complete(x)
    neg = Classifier(classifier, ctok, label="neg").complete(x)
    torch.testing.assert_close(pos, Classifier(classifier, ctok, label=1).complete(x))
    torch.testing.assert_close(pos.exp() + neg.exp(), torch.ones(4, dtype=torch.float64))
    assert pos.max() - pos.min() > 0.1  # the texts really are scored differently


def test_classifier_prefix_only_as_twist(classifier):
    ctok = make_tokenizer(with_pad=True)
    x = particles([[0, 1], [6]])
    plain = Classifier(classifier, ctok, label=1)
    assert not plain.has_prefix
    assert_scores(plain.prefix(x), [0.0, 0.0])
    twist = Classifier(classifier, ctok, label=1, as_twist=True)
    assert twist.has_prefix
    torch.testing.assert_close(twist.prefix(x), plain.complete(x))


def test_classifier_include_prompt_scores_whole_text(classifier):
    ctok = make_tokenizer(with_pad=True)
    x = particles([[3, 4], [5]], prompts=["a b c"])
    got = Classifier(classifier, ctok, label=1, include_prompt=True).complete(x)
    expected = [_manual_class_logp(classifier, t, 1) for t in ["a b c d e", "a b c f"]]
    torch.testing.assert_close(got, scores(*expected), atol=1e-5, rtol=1e-5)


def test_classifier_unknown_label(classifier):
    with pytest.raises(ValueError, match="'maybe'"):
        Classifier(classifier, make_tokenizer(with_pad=True), label="maybe")


def test_classifier_scores_a_batch_of_empty_texts(classifier):
    # regression: rows that all end at once with EOS (empty replies) used to crash the
    # forward pass (a [R, 0] batch); each empty text scores as it does beside a longer one
    ctok = make_tokenizer(with_pad=True)
    phi = Classifier(classifier, ctok, label=1, as_twist=True)
    empty = phi.complete(particles([[EOS], [EOS]]))
    mixed = phi.complete(particles([[EOS], [0, 1]]))
    assert empty.shape == (2,) and torch.isfinite(empty).all()
    torch.testing.assert_close(empty, mixed[[0, 0]])
    torch.testing.assert_close(phi.prefix(particles([[], []])), empty)


# --------------------------------------------------------------------------- Reward


def test_reward_passes_values_through():
    r = Reward(lambda texts: [-0.5 * len(t) for t in texts])
    x = particles([[0], [0, 1], [0, 1, 2, EOS]])  # "a", "a b", "a b c"
    assert_scores(r.complete(x), [-0.5, -1.5, -2.5])
    assert not r.has_prefix
    assert_scores(r.prefix(x), [0.0, 0.0, 0.0])


def test_reward_prefix_fn_and_neg_inf():
    r = Reward(
        lambda texts: [NINF if "h" in t else 1.0 for t in texts],
        prefix_fn=lambda texts: [float(len(t.split())) for t in texts],
    )
    x = particles([[7], [0, 1]])
    assert r.has_prefix
    assert_scores(r.complete(x), [NINF, 1.0])
    assert_scores(r.prefix(x), [1.0, 2.0])


def test_reward_wrong_length_raises():
    r = Reward(lambda texts: [0.0] * (len(texts) + 1))
    with pytest.raises(ValueError, match=r"returned \(3,\) values for 2 texts"):
        r.complete(particles([[0], [1]]))
    bad_prefix = Reward(lambda t: [0.0] * len(t), prefix_fn=lambda t: [])
    with pytest.raises(ValueError, match="for 2 texts"):
        bad_prefix.prefix(particles([[0], [1]]))


# --------------------------------------------------------------------------- Tempered


def test_tempered_scales_scores():
    base = Reward(lambda texts: [-1.0, -3.0, NINF][: len(texts)], prefix_fn=lambda t: [-2.0] * 3)
    x = particles([[0], [1], [2]])
    t = Tempered(base, 0.5)
    assert_scores(t.complete(x), [-0.5, -1.5, NINF])
    assert_scores(t.prefix(x), [-1.0, -1.0, -1.0])
    assert t.has_prefix
    assert t.token_scores(x) is None
    p = base**3
    assert isinstance(p, Tempered) and p.beta == 3.0
    assert_scores(p.complete(x), [-3.0, -9.0, NINF])


def test_tempered_token_scores():
    m = TokenMask(banned=[2])
    x = particles([[0, 1], [2]])
    t = m**2.0
    torch.testing.assert_close(t.token_scores(x), 2.0 * m.token_scores(x))
    assert_scores(t.complete(x), [0.0, NINF])


@pytest.mark.parametrize("beta", [0, 0.0, -1.0, float("nan")])
def test_tempered_rejects_non_positive_beta(beta):
    with pytest.raises(ValueError, match="beta must be > 0"):
        Tempered(Contains("a"), beta)
    with pytest.raises(ValueError, match="beta must be > 0"):
        Contains("a") ** beta


# --------------------------------------------------------------------------- Product


def test_product_adds_log_scores():
    r1 = Reward(lambda t: [-1.0] * len(t))
    r2 = Reward(lambda t: [-2.0, NINF][: len(t)], prefix_fn=lambda t: [-0.25] * len(t))
    x = particles([[0], [1]])
    p = r1 * r2
    assert isinstance(p, Product)
    assert_scores(p.complete(x), [-3.0, NINF])
    assert p.has_prefix  # some part has prefix scores
    assert_scores(p.prefix(x), [-0.25, -0.25])
    assert not (r1 * Contains("a")).has_prefix


def test_product_flattens():
    a, b, c = Contains("a"), Contains("b"), TokenMask(banned=[3])
    assert (a * b * c).potentials == [a, b, c]
    assert (a * (b * c)).potentials == [a, b, c]
    assert Product(a * b, b * c).potentials == [a, b, b, c]
    t = (a * b) ** 2
    assert isinstance(t, Tempered) and (t * c).potentials == [t, c]  # Tempered is opaque
    with pytest.raises(ValueError, match="at least one"):
        Product()


def test_product_token_scores():
    m1, m2 = TokenMask(banned=[1]), TokenMask(allowed=[0, 1, 2])
    x = particles([[0, 2], [0, 1]])
    s = (m1 * m2).token_scores(x)
    torch.testing.assert_close(s, m1.token_scores(x) + m2.token_scores(x))
    assert (s[0, [0, 2, EOS]] == 0).all()
    assert torch.isneginf(s[0, [1, 3, 4, 5, 6, 7]]).all()
    assert torch.isneginf(s[1]).all()
    torch.testing.assert_close((m1 * m2**2.0).token_scores(x), s)  # 2 * -inf == -inf
    assert (m1 * Contains("a")).token_scores(x) is None
    assert (Contains("a") * m1 * m2).token_scores(x) is None


def test_product_complete_matches_parts():
    c = Contains("a")
    m = TokenMask(banned=[1])
    x = particles([[0, 2], [0, 1], [2, 3]])
    assert_scores((c * m).complete(x), [0.0, NINF, NINF])
    assert_scores((c * m).prefix(x), [0.0, NINF, 0.0])


def test_custom_potential_defaults():
    class Half(Potential):
        def complete(self, x):
            return torch.full((x.num_rows,), -0.5, dtype=torch.float64)

    h = Half()
    x = particles([[0], [1]])
    assert not h.has_prefix and h.token_scores(x) is None
    assert_scores(h.prefix(x), [0.0, 0.0])
    assert_scores((h * h * h).complete(x), [-1.5, -1.5])
