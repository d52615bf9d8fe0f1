"""Twists psi_t: intermediate potentials that tell SMC which prefixes look promising.

With twist psi_t the incremental weight of a particle extended by x_t is

    log G_t = log p(x_t|.) - log q(x_t|.) + log psi_t(x_<=t) - log psi_{t-1}(x_<t)

with psi_0 = 1, and at a complete sequence psi is replaced by the potential phi, so
the final weights are exact for sigma whatever the twist (as long as psi > 0 where
sigma has mass). A good twist only lowers variance.

Sources here: :class:`NoTwist` (psi = 1, plain SMC), :class:`PotentialTwist` (a
potential's own prefix scores, which a run uses by default: :func:`resolve_twist`). A
learned twist subclasses :class:`Twist`: it may keep per-row state (e.g. its own KV
cache) through ``start``/``advance``/``reorder``, which the engine calls exactly as for
the base model's cache, and find the state of the rows it is asked about by their
numbers ``x.rows``, as :class:`~llmsample.ctl.head.LearnedTwist` does (a head trained
by :mod:`llmsample.ctl`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from llmsample.hf.prompts import PromptBatch
from llmsample.particles import Particles
from llmsample.potentials.base import Potential

__all__ = [
    "Twist",
    "NoTwist",
    "PotentialTwist",
    "PotentialReader",
    "RUN_POTENTIAL",
    "resolve_twist",
    "effective_twist",
]

RUN_POTENTIAL = "run"  # a twist built with this takes the SMC run's potential at bind


class Twist(ABC):
    """Interface. ``prefix`` returns log psi_t for incomplete rows, [R] float64.

    ``next_token`` optionally returns log psi of every one-token extension, [R, V],
    using the potential's complete score where the extension completes the sequence;
    it enables the locally optimal proposal and then also supplies the weights.
    """

    informative: bool = True

    def bind(self, potential: Potential | None) -> None:
        """Called once per run, before ``start``, with the run's potential (None: phi = 1).

        The engine passes the potential here, so a run names it once; a twist that
        scores completions with phi (:class:`PotentialReader`) keeps it."""

    def start(self, prompts: PromptBatch, num_particles: int) -> None:
        """Called once before the first step (stateful twists set up here)."""

    def advance(self, tokens: Tensor) -> None:
        """Called after every row appended ``tokens`` ([R])."""

    def reorder(self, index: Tensor) -> None:
        """Called when rows are resampled: row r becomes old row ``index[r]``."""

    @abstractmethod
    def prefix(self, x: Particles) -> Tensor:
        """log psi_t of the rows' current (incomplete) prefixes."""

    def next_token(self, x: Particles) -> Tensor | None:
        return None


class PotentialReader(Twist):
    """A twist that puts the run's log phi on completing extensions.

    Build it with ``potential=RUN_POTENTIAL`` (the default of the twists here) and the
    engine hands it the run's potential at :meth:`bind`; a potential given explicitly
    must be the run's own object, else ``bind`` raises (the twist's scores would then
    target another distribution). ``self.potential`` is the bound one (None: phi = 1).
    """

    def __init__(self, potential: Potential | None | str = RUN_POTENTIAL):
        if isinstance(potential, str) and potential != RUN_POTENTIAL:
            raise ValueError(f"potential must be a Potential, None or {RUN_POTENTIAL!r}")
        self.given = potential
        self.potential = None if isinstance(potential, str) else potential

    def bind(self, potential: Potential | None) -> None:
        if not isinstance(self.given, str) and self.given is not potential:
            raise ValueError(
                f"{type(self).__name__} was built with potential {self.given!r} but the SMC "
                f"run's potential is {potential!r}: build the twist without one (the run "
                "passes its potential) or pass the run the same object"
            )
        self.potential = potential


class NoTwist(Twist):
    """psi = 1: SMC reweights only when a particle completes."""

    informative = False

    def prefix(self, x: Particles) -> Tensor:
        return torch.zeros(x.num_rows, dtype=torch.float64, device=x.device)


class PotentialTwist(Twist):
    """psi_t from the potential's own prefix scores (and token scores when it has them)."""

    def __init__(self, potential: Potential):
        self.potential = potential
        self.informative = potential.has_prefix

    def prefix(self, x: Particles) -> Tensor:
        return self.potential.prefix(x)

    def next_token(self, x: Particles) -> Tensor | None:
        return self.potential.token_scores(x)


def resolve_twist(twist, potential: Potential | None) -> Twist:
    """The twist a run asks for. A potential says once, when it is built, whether it scores
    prefixes (``has_prefix``: e.g. ``Contains(..., prefix_bonus=2)``,
    ``SuffixLikelihood(..., as_twist=True)``, ``TokenMask``); the run then twists with
    those scores unless told otherwise:

    - ``"auto"`` (the default): :class:`PotentialTwist` when the potential has prefix
      scores, else :class:`NoTwist`;
    - ``"prefix"``: the same, but an error when it has none (a run that must twist);
    - ``"none"`` or None: psi = 1 (the potential scores only complete sequences);
    - a :class:`Twist` (a learned one): as is.
    """
    if isinstance(twist, Twist):
        return twist
    if twist in (None, "none"):
        return NoTwist()
    if twist not in ("auto", "prefix"):
        raise ValueError(
            f"twist must be 'auto', 'prefix', 'none' or a Twist instance, got {twist!r}"
        )
    if potential is not None and potential.has_prefix:
        return PotentialTwist(potential)
    if twist == "auto":
        return NoTwist()
    if potential is None:
        raise ValueError("twist='prefix' needs a potential to take prefix scores from")
    raise ValueError(
        f"twist='prefix' but {potential!r} has no prefix scores; use twist='none' or a "
        "potential with prefix scores (e.g. Regex(..., mode='fullmatch'), TokenMask, "
        "Contains(..., prefix_bonus=2))"
    )


def effective_twist(twist: Twist, *, resamples: bool, proposal_reads_scores: bool) -> Twist:
    """The twist a run evaluates: ``twist``, or :class:`NoTwist` when it cannot change the
    output. A run that never resamples (importance sampling, ``ess_threshold=0``) with a
    proposal that does not read the twist's token scores only adds log psi_t - log psi_{t-1}
    to each weight, and a row that completes swaps its last log psi for log phi: the psi
    terms telescope away, so every particle and every final weight is the same (up to float
    rounding) without them, while each step's prefix scoring is wasted work (a model pass
    per step for ``SuffixLikelihood(as_twist=True)``). Only the per-step ESS trace (it then
    follows the untwisted weights) and the forward-token count (that pass is gone) differ."""
    if resamples or proposal_reads_scores:
        return twist
    return NoTwist()
