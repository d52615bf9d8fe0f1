"""Concept coverage: "use every concept, in any inflected form" (CommonGen).

    from llmsample.potentials.concepts import Concepts, ConceptCoverage, covers_all

    covers_all("The player stood in the fields, looking around.", "field_N#look_V#stand_V")
    phi = Concepts("field_N#look_V#stand_V", prefix_bonus=1.0)  # hard, with a twist
    soft = ConceptCoverage("dog#frisbee#catch", beta=5.0)  # log phi = beta * (coverage - 1)
    phi = PerPrompt([Concepts(cs) for cs in concept_sets])  # one concept set per prompt

Matching follows CommonGen's official coverage (lemmatize the output, look for each
concept's lemma), with lemminflect's offline tables instead of spaCy:

- **Words.** The text is lowercased and split into runs of letters/digits; hyphens,
  underscores and punctuation separate words ("ice-cream" is "ice", "cream", as in
  spaCy). A clitic after an apostrophe is dropped ("dog's" -> "dog", "don't" -> "do");
  any other apostrophe stays inside the word ("o'clock").
- **Match.** A word meets a concept word ``c`` if it equals ``c``, if ``c`` is one of
  its lemmas (lemminflect ``getAllLemmas``; for unknown words ``getAllLemmasOOV`` as a
  noun and as a verb), or if it is one of ``c``'s inflections (``getAllInflections``,
  OOV rules for unknown concepts: "selfies" meets "selfie"). So "stood" meets stand,
  "children" child, "mice" mouse, "went" go; "standard" does not meet stand.
- **POS is ignored.** CommonGen's own coverage script compares POS-free concept words
  with spaCy lemmas, and ``field_N`` is also met by "fielding". The suffix is parsed
  and kept on :class:`Concept` for reference only.
- **Multi-word concepts** ("ice cream", "take_off") need their words consecutively, each
  in any inflected form ("ice creams", "took off"). CommonGen has none.
- Comparative adjectives resolve only where lemminflect lists them ("better" -> good,
  "bigger" -> big); no promise beyond that.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from lemminflect import getAllInflections, getAllInflectionsOOV, getAllLemmas, getAllLemmasOOV
from torch import Tensor

from llmsample.particles import Particles
from llmsample.potentials.base import Potential
from llmsample.potentials.text import Constraint

__all__ = [
    "Concept",
    "parse_concept_set",
    "covered",
    "coverage",
    "covers_all",
    "Concepts",
    "ConceptCoverage",
]

_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")
_CLITICS = frozenset({"s", "re", "ve", "ll", "d", "m", "t"})
_TRAILING = re.compile(r"[\w'\u2019]+\Z")  # a word the next token may still extend
_POS_TAGS = frozenset({"N", "V", "A", "J", "R", "NOUN", "VERB", "ADJ", "ADV"})


def _words(text: str) -> list[str]:
    """Lowercased words of ``text`` with clitics dropped (see the module docstring)."""
    out = []
    for w in _WORD.findall(text.lower().replace("\u2019", "'")):
        head, _, tail = w.partition("'")
        if tail in _CLITICS:
            w = head[:-1] if tail == "t" and head.endswith("n") else head
        out.append(w)
    return out


@lru_cache(maxsize=1 << 16)
def _lemmas(word: str) -> frozenset[str]:
    table = getAllLemmas(word) or {**getAllLemmasOOV(word, "NOUN"), **getAllLemmasOOV(word, "VERB")}
    return frozenset(lemma for lemmas in table.values() for lemma in lemmas)


@lru_cache(maxsize=1 << 14)
def _forms(word: str) -> frozenset[str]:
    """``word`` and its inflections."""
    table = getAllInflections(word) or {
        **getAllInflectionsOOV(word, "NOUN"),
        **getAllInflectionsOOV(word, "VERB"),
    }
    return frozenset({word, *(f for forms in table.values() for f in forms)})


def _meets(word: str, concept_word: str) -> bool:
    return word in _forms(concept_word) or concept_word in _lemmas(word)


@dataclass(frozen=True)
class Concept:
    """One concept: ``lemma`` (lowercase words joined by spaces) and an optional POS tag
    as given ("N", "V", ...; informational, matching ignores it)."""

    lemma: str
    pos: str | None = None
    words: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        words = _words(self.lemma)
        if not words:
            raise ValueError(f"concept {self.lemma!r} has no word in it")
        object.__setattr__(self, "lemma", " ".join(words))
        object.__setattr__(self, "words", tuple(words))

    def __str__(self) -> str:
        return self.lemma if self.pos is None else f"{self.lemma}_{self.pos}"


def _parse_one(item: str | Concept) -> Concept:
    if isinstance(item, Concept):
        return item
    if not isinstance(item, str):
        raise TypeError(f"a concept is a string or a Concept, got {type(item).__name__}")
    if not item.strip():
        raise ValueError(f"empty concept {item!r}")
    word, sep, pos = item.strip().rpartition("_")
    return Concept(word, pos) if sep and pos in _POS_TAGS else Concept(item)


def parse_concept_set(concepts: str | Concept | Iterable[str | Concept]) -> list[Concept]:
    """``"field_N#look_V#stand_V"`` (CommonGen), a plain word, or a list of either, to
    a list of :class:`Concept`. A trailing ``_N``/``_V``/``_A``/``_R`` (or ``_NOUN``...)
    is the POS; any other underscore separates words."""
    if isinstance(concepts, (str, Concept)):
        concepts = [concepts]
    items = [c for item in concepts for c in (item.split("#") if isinstance(item, str) else [item])]
    if not items:
        raise ValueError("the concept set is empty")
    return [_parse_one(c) for c in items]


def _as_concepts(concepts) -> Sequence[Concept]:
    if isinstance(concepts, (list, tuple)) and all(isinstance(c, Concept) for c in concepts):
        return concepts
    return parse_concept_set(concepts)


def covered(text: str, concepts) -> list[bool]:
    """Whether each concept occurs in ``text`` in some inflected form."""
    words = _words(text)
    present = set(words)
    lemmas = set().union(*map(_lemmas, present))
    out = []
    for c in _as_concepts(concepts):
        if len(c.words) == 1:
            (cw,) = c.words
            out.append(cw in lemmas or not _forms(cw).isdisjoint(present))
        else:
            n = len(c.words)
            out.append(
                any(
                    all(_meets(w, cw) for w, cw in zip(words[i : i + n], c.words))
                    for i in range(len(words) - n + 1)
                )
            )
    return out


def coverage(text: str, concepts) -> float:
    """The fraction of the concepts that ``text`` covers."""
    hits = covered(text, concepts)
    return sum(hits) / len(hits)


def covers_all(text: str, concepts) -> bool:
    """Whether ``text`` covers every concept."""
    return all(covered(text, concepts))


def _complete_words(text: str) -> str:
    """``text`` without its trailing word when the next token could still extend it
    ("stand" may become "standard"); a prefix cut inside a character ends in U+FFFD."""
    return _TRAILING.sub("", text.rstrip("\ufffd"))


def _flatten(concepts) -> list[Concept]:
    if len(concepts) == 1:
        concepts = concepts[0]
    return parse_concept_set(concepts)


class Concepts(Constraint):
    """Hard constraint: the continuation covers every concept in some inflected form.

    ``Concepts("field_N#look_V#stand_V")``, ``Concepts("dog", "frisbee")`` or
    ``Concepts(["dog", "frisbee"])``. Like :class:`~llmsample.potentials.Contains`, any
    prefix can still be completed, so there is no exact prefix score; ``prefix_bonus > 0``
    adds the heuristic twist psi = exp(bonus * concepts covered by the prefix's complete
    words). The trailing word is left out until a non-word character follows it, so a
    prefix ending in "stand" does not collect a bonus that "standard" would take back.
    """

    def __init__(self, *concepts, prefix_bonus: float = 0.0):
        if not concepts:
            raise ValueError("Concepts needs at least one concept")
        if not (prefix_bonus >= 0 and math.isfinite(prefix_bonus)):  # also rejects NaN
            raise ValueError(f"prefix_bonus must be finite and >= 0, got {prefix_bonus}")
        self.concepts = _flatten(concepts)
        self.prefix_bonus = float(prefix_bonus)
        super().__init__(lambda t: covers_all(t, self.concepts), name="concepts")
        self.has_prefix = self.prefix_bonus > 0
        self.prefix_is_upper_bound = not self.has_prefix  # the bonus grows along a path

    def prefix(self, x: Particles) -> Tensor:
        if not self.has_prefix:
            return super().prefix(x)
        found = [sum(covered(_complete_words(t), self.concepts)) for t in x.texts()]
        return self.prefix_bonus * torch.tensor(found, dtype=torch.float64, device=x.device)

    def __repr__(self) -> str:
        bonus = f", prefix_bonus={self.prefix_bonus:g}" if self.prefix_bonus else ""
        return f"Concepts({'#'.join(map(str, self.concepts))!r}{bonus})"


class ConceptCoverage(Potential):
    """Soft reward: log phi = beta * (coverage - 1), so 0 when every concept is covered
    and -beta when none is. ``as_twist`` scores prefixes the same way (complete words)."""

    def __init__(self, *concepts, beta: float = 1.0, as_twist: bool = False):
        if not concepts:
            raise ValueError("ConceptCoverage needs at least one concept")
        if not (beta > 0 and math.isfinite(beta)):
            raise ValueError(f"beta must be finite and > 0, got {beta}")
        self.concepts, self.beta, self.has_prefix = _flatten(concepts), float(beta), as_twist
        self.prefix_is_upper_bound = not as_twist  # log phi <= 0 = log psi

    def _score(self, texts: list[str], device) -> Tensor:
        cov = torch.tensor([coverage(t, self.concepts) for t in texts], dtype=torch.float64)
        return (self.beta * (cov - 1.0)).to(device)

    def complete(self, x: Particles) -> Tensor:
        return self._score(x.texts(), x.device)

    def prefix(self, x: Particles) -> Tensor:
        if not self.has_prefix:
            return super().prefix(x)
        return self._score([_complete_words(t) for t in x.texts()], x.device)

    def __repr__(self) -> str:
        return f"ConceptCoverage({'#'.join(map(str, self.concepts))!r}, beta={self.beta:g})"
