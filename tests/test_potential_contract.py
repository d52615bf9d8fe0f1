"""Every public potential keeps the interface's contract (``llmsample.testing.check_potential``).

The potential classes are discovered (every public ``Potential`` subclass defined under
``llmsample.potentials``), so a new one without an entry in ``FACTORIES`` fails
``test_every_public_potential_has_a_factory``. Deliberately broken potentials show that
the check catches each rule it names.
"""

import importlib
import inspect
import math
import pkgutil
import sys
from functools import cache

import pytest
import torch
from conftest import EOS

import llmsample.potentials
from llmsample.potentials import (
    Classifier,
    ConceptCoverage,
    Concepts,
    Constraint,
    Contains,
    PerPrompt,
    Potential,
    Product,
    Regex,
    Reward,
    SuffixLikelihood,
    Tempered,
    TokenMask,
)
from llmsample.testing import (
    PotentialContractError,
    check_potential,
    toy_batches,
    toy_classifier,
    toy_model,
    toy_particles,
    toy_tokenizer,
)


@cache
def _tok():
    return toy_tokenizer(with_pad=True)


@cache
def _lm():
    return toy_model("gpt2")


@cache
def _clf():
    return toy_classifier()


def _short(text: str) -> bool:
    return len(text) <= 5  # prefix-closed: a longer text only gets longer


def _log_len(texts):
    return [-0.5 * len(t) for t in texts]


def _count_a(texts):
    return [0.25 * t.split().count("a") for t in texts]


# one entry per public potential class: instances that exercise its options on the toy
# vocabulary ("a".."h" are ids 0..7, EOS is 8; toy_batches has two prompts)
FACTORIES = {
    Constraint: lambda: [
        Constraint(lambda t: "b" in t.split(), name="has b"),
        Constraint(_short, prefix_predicate=_short, name="short"),
    ],
    Regex: lambda: [
        Regex("b"),
        Regex(r"[a-d ]*", mode="fullmatch"),
        Regex(r"a( [a-h])*", mode="fullmatch"),
    ],
    Contains: lambda: [Contains("a"), Contains("a", "b", prefix_bonus=1.0)],
    Reward: lambda: [Reward(_log_len), Reward(_log_len, prefix_fn=_count_a)],
    TokenMask: lambda: [TokenMask(banned=[1, 5]), TokenMask(allowed=[0, 2, 4, 7])],
    SuffixLikelihood: lambda: [
        SuffixLikelihood(_lm(), _tok(), "g h"),
        SuffixLikelihood(_lm(), _tok(), ["g h", "a"], as_twist=True),
    ],
    Classifier: lambda: [
        Classifier(_clf(), _tok(), "pos"),
        Classifier(_clf(), _tok(), 0, include_prompt=True, as_twist=True),
    ],
    Tempered: lambda: [
        Tempered(TokenMask(banned=[3]), 2.0),
        Contains("a", prefix_bonus=1.0) ** 0.5,
    ],
    Product: lambda: [
        Product(TokenMask(banned=[3]), TokenMask(allowed=[0, 1, 2, 3, 4])),
        Contains("a") * TokenMask(banned=[7]) * Reward(_log_len),
    ],
    PerPrompt: lambda: [
        PerPrompt([TokenMask(banned=[0]), TokenMask(banned=[7])]),
        PerPrompt([Contains("a", prefix_bonus=1.0), Regex(r"[a-d ]*", mode="fullmatch")]),
    ],
    Concepts: lambda: [Concepts("a#b"), Concepts("a", "c", prefix_bonus=1.0)],
    ConceptCoverage: lambda: [
        ConceptCoverage("a#c", beta=2.0),
        ConceptCoverage("a#c", as_twist=True),
    ],
}


def _public_potential_classes() -> set[type]:
    """Concrete public Potential subclasses defined in llmsample.potentials (any module)
    or exported by it."""
    pkg = llmsample.potentials
    for info in pkgutil.walk_packages(pkg.__path__, f"{pkg.__name__}."):
        importlib.import_module(info.name)

    def walk(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from walk(sub)

    defined = {
        c
        for c in walk(Potential)
        if c.__module__.startswith(pkg.__name__) and not c.__name__.startswith("_")
    }
    exported = {getattr(pkg, n) for n in pkg.__all__}
    exported |= {getattr(pkg.concepts, n) for n in pkg.concepts.__all__}
    exported = {c for c in exported if inspect.isclass(c) and issubclass(c, Potential)}
    return {c for c in defined | exported if not inspect.isabstract(c)}


def test_every_public_potential_has_a_factory():
    found = _public_potential_classes()
    assert len(found) >= 12
    missing = sorted(c.__name__ for c in found - set(FACTORIES))
    assert not missing, f"add the potential(s) {missing} to FACTORIES in this file"
    assert set(FACTORIES) <= found  # no stale entry


def test_every_public_potential_is_exported():
    pkg = llmsample.potentials
    names = {c.__name__ for c in _public_potential_classes()}
    assert names <= set(pkg.__all__)


@pytest.mark.parametrize("cls", list(FACTORIES), ids=lambda c: c.__name__)
def test_potential_keeps_the_contract(cls):
    instances = FACTORIES[cls]()
    assert instances and all(type(p) is cls for p in instances)
    for potential in instances:
        check_potential(potential)


# --------------------------------------------------------------------------- the flag


def test_prefix_is_upper_bound_where_documented():
    assert not Potential.prefix_is_upper_bound  # the default claims nothing
    assert Regex("a", mode="fullmatch").prefix_is_upper_bound
    assert Constraint(_short, _short).prefix_is_upper_bound
    assert TokenMask(banned=[0]).prefix_is_upper_bound
    assert Contains("a").prefix_is_upper_bound
    assert not Contains("a", prefix_bonus=1.0).prefix_is_upper_bound
    assert not Concepts("a", prefix_bonus=1.0).prefix_is_upper_bound
    assert not Reward(_log_len).prefix_is_upper_bound  # a reward may be > 0
    assert SuffixLikelihood(_lm(), _tok(), "a").prefix_is_upper_bound
    assert not SuffixLikelihood(_lm(), _tok(), "a", as_twist=True).prefix_is_upper_bound
    assert (TokenMask(banned=[0]) ** 2).prefix_is_upper_bound
    assert not (TokenMask(banned=[0]) * Reward(_log_len)).prefix_is_upper_bound
    assert not PerPrompt([Contains("a"), Reward(_log_len)]).prefix_is_upper_bound


def test_a_heuristic_twist_is_rightly_not_an_upper_bound():
    grows = Contains("a", prefix_bonus=1.0)
    check_potential(grows)
    grows.prefix_is_upper_bound = True  # claiming it is wrong: the bonus grows
    with pytest.raises(PotentialContractError, match="prefix_is_upper_bound"):
        check_potential(grows)


# --------------------------------------------------------------------------- broken ones


class _Broken(Potential):
    """A hard constraint "no token 1" with one rule broken (``flaw``)."""

    def __init__(self, flaw: str):
        self.flaw, self.mask = flaw, TokenMask(banned=[1])
        self.has_prefix = flaw != "prefix without has_prefix"
        self.prefix_is_upper_bound = flaw in ("not an upper bound", "prefix rises")

    def complete(self, x):
        phi = self.mask.complete(x)
        if self.flaw == "float32":
            return phi.float()
        if self.flaw == "nan":
            return torch.where(torch.isinf(phi), math.nan, phi)
        if self.flaw == "sees EOS":
            return phi - 0.5 * (x.lengths > x.content_mask().sum(1))
        if self.flaw == "batch dependent":
            return phi - 0.1 * x.num_rows
        if self.flaw == "not an upper bound":
            return phi + 1.0
        return phi

    def prefix(self, x):
        psi = self.mask.prefix(x)
        if self.flaw == "prefix without has_prefix":
            return psi - 1.0
        if self.flaw == "dead prefix":
            return torch.full_like(psi, -math.inf)
        if self.flaw == "prefix rises":
            return psi + x.step
        return psi

    def token_scores(self, x):  # only where the flaw is elsewhere it would be caught first
        if self.flaw not in ("none", "token_scores"):
            return None
        s = self.mask.token_scores(x)
        if self.flaw == "token_scores":
            s[:, 2] += 1.0
        return s

    def __repr__(self):
        return f"Broken({self.flaw})"


@pytest.mark.parametrize(
    "flaw, rule",
    [
        ("token_scores", "token_scores[x, v] is complete(x + v)"),
        ("not an upper bound", "prefix_is_upper_bound"),
        ("prefix rises", "prefix_is_upper_bound"),
        ("dead prefix", "a -inf prefix score only where no completion survives"),
        ("float32", "complete returns [R] float64"),
        ("nan", "complete has no NaN or +inf"),
        ("prefix without has_prefix", "psi = 1 without has_prefix"),
        ("sees EOS", "complete(x + EOS) == complete(x)"),
        ("batch dependent", "a view of some rows scores as those rows of the whole view"),
    ],
)
def test_the_check_catches_a_broken_potential(flaw, rule):
    check_potential(_Broken("none"))  # the unbroken one passes
    with pytest.raises(PotentialContractError) as info:
        check_potential(_Broken(flaw))
    message = str(info.value)
    assert isinstance(info.value, AssertionError)
    assert message.startswith(f"Broken({flaw}) breaks the rule '") and rule in message


def test_the_error_names_the_offending_particle():
    x = toy_particles([[0, 2], [3, 3]], prompts=["a"], max_new_tokens=4)
    with pytest.raises(PotentialContractError) as info:
        check_potential(_Broken("token_scores"), x)
    message = str(info.value)
    assert (
        "row 0 of prompt 0 at step 2/4, tokens [0, 2], text 'a c', extended by token 2" in message
    )
    assert "token_scores 1.0 vs prefix(x + v) 0.0" in message


def test_the_check_reads_only_the_tokens_asked_for():
    x = toy_particles([[0, 2], [3, 3]], prompts=["a"], max_new_tokens=4)
    check_potential(_Broken("token_scores"), x, tokens=[0, 1, EOS])  # token 2 not tried
    with pytest.raises(PotentialContractError):
        check_potential(_Broken("token_scores"), x, tokens=[2])


def test_a_reward_with_a_dead_prefix_is_caught():
    dead = Reward(_log_len, prefix_fn=lambda texts: [-math.inf if "a" in t else 0.0 for t in texts])
    with pytest.raises(PotentialContractError, match="no completion survives"):
        check_potential(dead)


def test_toy_batches_cover_first_middle_and_last_steps():
    steps = [(x.step, x.max_new_tokens, x.prompts.size) for x in toy_batches()]
    assert steps == [(0, 4, 2), (2, 4, 2), (3, 4, 2)]


# --------------------------------------------------------------------------- public paths


def test_the_package_exports_its_modules_public_names():
    pkg = llmsample.potentials
    parts = [pkg.base, pkg.text, pkg.tokens, pkg.model, pkg.concepts]
    joined = [n for part in parts for n in part.__all__]
    assert sorted(pkg.__all__) == sorted(joined) and len(set(joined)) == len(joined)
    for part in parts:
        for name in part.__all__:
            assert getattr(pkg, name) is getattr(part, name)


def test_the_old_core_path_still_gives_every_name():
    """``llmsample.potentials.core`` was split; its old imports go through the alias."""
    sys.modules.pop("llmsample.potentials.core", None)  # warns on the first import only
    with pytest.warns(FutureWarning, match="potentials.core moved to llmsample.potentials"):
        core = importlib.import_module("llmsample.potentials.core")
    names = ["Potential", "Constraint", "Regex", "Contains", "TokenMask", "SuffixLikelihood"]
    names += ["Classifier", "Reward", "Tempered", "Product", "PerPrompt"]
    for name in names:
        assert getattr(core, name) is getattr(llmsample.potentials, name)
