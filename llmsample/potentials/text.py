"""Potentials on the decoded continuation text: hard constraints and rewards.

    from llmsample.potentials import Constraint, Contains, Regex, Reward

    phi = Contains("love", prefix_bonus=1.0)        # whole words, with a heuristic twist
    phi = Regex(r"[a-z ]+", mode="fullmatch")       # exact-support prefix scores
    phi = Constraint(lambda t: len(t) < 80, name="short")
    phi = Reward(lambda texts: [-len(t) / 10 for t in texts])  # log rewards

Hard constraints score 0 (phi = 1) or ``-inf`` (phi = 0); their prefix score, when they
have one, is a feasibility test, so ``prefix_is_upper_bound`` holds (see
:class:`~llmsample.potentials.base.Potential`). A heuristic twist (``prefix_bonus``) gives
that up.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import regex
import torch
from torch import Tensor

from llmsample.particles import Particles
from llmsample.potentials.base import Potential

__all__ = ["Constraint", "Regex", "Contains", "Reward"]

NEG_INF = float("-inf")


def _hard(ok: Sequence[bool], device) -> Tensor:
    ok = torch.as_tensor(list(ok), dtype=torch.bool, device=device)
    return torch.where(ok, 0.0, NEG_INF).to(torch.float64)


class Constraint(Potential):
    """Hard constraint from a predicate on the decoded continuation text.

    ``prefix_predicate``, when given, must be prefix-closed: it returns False only for
    prefixes that no completion can rescue. It then serves as an exact-support twist.
    """

    prefix_is_upper_bound = True  # complete <= 0 = prefix, or prefix-closed feasibility

    def __init__(
        self,
        predicate: Callable[[str], bool],
        prefix_predicate: Callable[[str], bool] | None = None,
        name: str | None = None,
    ):
        self.predicate = predicate
        self.prefix_predicate = prefix_predicate
        self.has_prefix = prefix_predicate is not None
        self.name = name or getattr(predicate, "__name__", "predicate")

    def complete(self, x: Particles) -> Tensor:
        return _hard([bool(self.predicate(t)) for t in x.texts()], x.device)

    def prefix(self, x: Particles) -> Tensor:
        if self.prefix_predicate is None:
            return super().prefix(x)
        return _hard([bool(self.prefix_predicate(t)) for t in x.texts()], x.device)

    def __repr__(self) -> str:
        return f"Constraint({self.name})"


class Regex(Constraint):
    """The continuation must match ``pattern``.

    ``mode="search"`` (anywhere in the text) or ``"fullmatch"`` (the whole text). In
    fullmatch mode the prefix score is exact support: a prefix survives iff some
    extension could still match (partial matching from the ``regex`` package).
    """

    def __init__(self, pattern: str, mode: str = "search", flags: int = 0):
        if mode not in ("search", "fullmatch"):
            raise ValueError(f"Regex mode must be 'search' or 'fullmatch', got {mode!r}")
        try:
            self.pattern = regex.compile(pattern, flags)
        except regex.error as err:
            raise ValueError(f"invalid regular expression {pattern!r}: {err}") from None
        match = getattr(self.pattern, mode)
        partial = None
        if mode == "fullmatch":

            def partial(text: str) -> bool:
                # a prefix cut inside a multi-byte character decodes to U+FFFD: drop it,
                # the character is not known yet (permissive is safe for a twist)
                text = text.rstrip("\ufffd")
                return self.pattern.fullmatch(text, partial=True) is not None

        super().__init__(lambda t: match(t) is not None, partial, name=f"{mode} {pattern!r}")


class Contains(Constraint):
    """Every word must appear in the continuation as a whole word (case-insensitive
    unless ``case_sensitive``).

    Any prefix can still be extended to contain the words, so there is no exact prefix
    score. ``prefix_bonus > 0`` adds a heuristic twist psi = exp(bonus * number of the
    words already present): SMC then resamples towards prefixes that have made
    progress. Any positive twist keeps the final weights exact; a good one only lowers
    variance.
    """

    def __init__(self, *words: str, case_sensitive: bool = False, prefix_bonus: float = 0.0):
        if not words or any(not w or not w.strip() for w in words):
            raise ValueError("Contains needs at least one non-empty word")
        if not (prefix_bonus >= 0 and math.isfinite(prefix_bonus)):  # also rejects NaN
            raise ValueError(f"prefix_bonus must be finite and >= 0, got {prefix_bonus}")
        flags = 0 if case_sensitive else regex.IGNORECASE
        self._pats = [regex.compile(rf"(?<!\w){regex.escape(w)}(?!\w)", flags) for w in words]
        self.words, self.prefix_bonus = words, float(prefix_bonus)
        super().__init__(
            lambda t: all(p.search(t) for p in self._pats), name=f"contains {list(words)}"
        )
        self.has_prefix = prefix_bonus > 0
        self.prefix_is_upper_bound = not self.has_prefix  # the bonus grows along a path

    def prefix(self, x: Particles) -> Tensor:
        if not self.has_prefix:
            return super().prefix(x)
        found = [sum(bool(p.search(t)) for p in self._pats) for t in x.texts()]
        return self.prefix_bonus * torch.tensor(found, dtype=torch.float64, device=x.device)


class Reward(Potential):
    """log phi from a callable on texts: ``fn(list[str]) -> list[float]`` of log rewards.

    ``prefix_fn`` (same signature) optionally scores prefixes for use as a twist.
    """

    def __init__(
        self,
        fn: Callable[[list[str]], Sequence[float]],
        prefix_fn: Callable[[list[str]], Sequence[float]] | None = None,
    ):
        self.fn, self.prefix_fn = fn, prefix_fn
        self.has_prefix = prefix_fn is not None

    def _call(self, fn, x: Particles) -> Tensor:
        values = torch.as_tensor(list(fn(x.texts())), dtype=torch.float64, device=x.device)
        if values.shape != (x.num_rows,):
            raise ValueError(
                f"reward function returned {tuple(values.shape)} values for {x.num_rows} texts"
            )
        return values

    def complete(self, x: Particles) -> Tensor:
        return self._call(self.fn, x)

    def prefix(self, x: Particles) -> Tensor:
        return self._call(self.prefix_fn, x) if self.prefix_fn else super().prefix(x)
