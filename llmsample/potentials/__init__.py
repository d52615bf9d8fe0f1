"""Targets: potentials score text (and token prefixes) and never sample.

from llmsample.potentials import Contains, Regex, Concepts, Product
"""

from llmsample.potentials.concepts import (
    Concept,
    ConceptCoverage,
    Concepts,
    coverage,
    covered,
    covers_all,
    parse_concept_set,
)
from llmsample.potentials.core import (
    Classifier,
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

__all__ = [
    "Potential",
    "Constraint",
    "Regex",
    "Contains",
    "TokenMask",
    "SuffixLikelihood",
    "Classifier",
    "Reward",
    "Tempered",
    "Product",
    "PerPrompt",
    "Concept",
    "parse_concept_set",
    "covered",
    "coverage",
    "covers_all",
    "Concepts",
    "ConceptCoverage",
]
