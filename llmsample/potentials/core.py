"""Compatibility module: the potentials that lived here now live in short modules by concern.

    llmsample.potentials.base    Potential, Tempered, Product, PerPrompt (the interface,
                                 the combinators and the per-prompt dispatch)
    llmsample.potentials.text    Constraint, Regex, Contains, Reward (on the decoded text)
    llmsample.potentials.tokens  TokenMask (on token ids)
    llmsample.potentials.model   SuffixLikelihood, Classifier (scored by a model, via hf/)

Import from ``llmsample.potentials`` (``from llmsample.potentials import Contains``) or
from the module above; ``from llmsample.potentials.core import Contains`` keeps working
and gives the same objects.
"""

from llmsample.potentials.base import PerPrompt, Potential, Product, Tempered
from llmsample.potentials.model import Classifier, SuffixLikelihood
from llmsample.potentials.text import Constraint, Contains, Regex, Reward
from llmsample.potentials.tokens import TokenMask

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
]
