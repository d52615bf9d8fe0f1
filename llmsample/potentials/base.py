"""The potential interface and its combinators: product, tempering, one potential per prompt.

A potential is a non-negative score phi(x, c) that defines the target

    sigma(x | c) = p(x | c) * phi(x, c) / Z(c)

It only scores; it never samples. All scores are in log space (``-inf`` is phi = 0, a
hard rejection). Three entry points, all on a :class:`~llmsample.Particles` view of R
rows:

- ``complete(x) -> [R]``: log phi of complete continuations (ended by EOS or cut at
  ``max_new_tokens``; the text excludes EOS). Required.
- ``prefix(x) -> [R]``: log of a prefix score usable as an SMC twist psi_t
  (``has_prefix`` says whether it is informative; the default is psi = 1). A run twists
  with it by default (``smc_generate(twist="auto")``), so the potential's constructor
  is the one place that switches a prefix twist on (e.g. ``prefix_bonus=``). A twist
  must be > 0 wherever the posterior has mass: for a hard constraint, prefix score 0
  must mean "no completion can satisfy it".
- ``token_scores(x) -> [R, V] | None``: the score of every one-token extension at
  once (prefix score, or the complete score when the extension completes the
  sequence: the token is EOS or the step is the last). This enables the locally
  optimal proposal. ``None`` when not available.

``prefix_is_upper_bound`` (default False) declares more: the prefix score never rises
along a path and bounds the complete score of every completion (see :class:`Potential`).
:func:`llmsample.testing.check_potential` checks all of this on toy particles.

Combine with ``*`` (product) and ``**`` (tempering), or one potential per prompt:

    from llmsample.potentials import Contains, PerPrompt, TokenMask

    phi = Contains("love") * TokenMask(banned=[bad_id]) ** 2.0
    phi = PerPrompt([Contains("love"), Contains("war")])  # prompt 0, prompt 1
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor

from llmsample.particles import Particles

__all__ = ["Potential", "Tempered", "Product", "PerPrompt"]


class Potential(ABC):
    """Base class. Subclasses implement :meth:`complete`; the rest is optional.

    ``has_prefix``: :meth:`prefix` is informative (else it is 0, psi = 1).

    ``prefix_is_upper_bound``: for every prefix x, ``prefix(x) >= prefix(x')`` for each
    extension x' of x and ``prefix(x) >= complete(y)`` for each completion y of x (x
    ended now included). It holds for hard constraints whose prefix score is 0 or an
    exact feasibility test (0 / ``-inf``), and for any potential with log phi <= 0 and
    the default psi = 1. Text-level potentials assume the decoded text of an extension
    starts with the text of its prefix (true of the usual tokenizers).
    """

    has_prefix: bool = False
    prefix_is_upper_bound: bool = False

    @abstractmethod
    def complete(self, x: Particles) -> Tensor:
        """log phi of complete continuations, [R] float64."""

    def prefix(self, x: Particles) -> Tensor:
        """log psi of the rows' prefixes, [R] float64 (0 unless ``has_prefix``)."""
        return torch.zeros(x.num_rows, dtype=torch.float64, device=x.device)

    def token_scores(self, x: Particles) -> Tensor | None:
        """[R, V] float64 scores of every one-token extension, or None (module docstring)."""
        return None

    def __mul__(self, other: Potential) -> Product:
        return Product(self, other)

    def __pow__(self, beta: float) -> Tempered:
        return Tempered(self, beta)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Tempered(Potential):
    """phi ** beta (log scores times ``beta``; beta = 0 gives phi = 1 even where phi = 0
    would be rejected, so beta must be > 0)."""

    def __init__(self, potential: Potential, beta: float):
        if not beta > 0:
            raise ValueError(f"tempering exponent beta must be > 0, got {beta}")
        self.potential, self.beta = potential, float(beta)
        self.has_prefix = potential.has_prefix
        self.prefix_is_upper_bound = potential.prefix_is_upper_bound  # beta > 0 keeps order

    def complete(self, x: Particles) -> Tensor:
        return self.beta * self.potential.complete(x)

    def prefix(self, x: Particles) -> Tensor:
        return self.beta * self.potential.prefix(x)

    def token_scores(self, x: Particles) -> Tensor | None:
        s = self.potential.token_scores(x)
        return None if s is None else self.beta * s

    def __repr__(self) -> str:
        return f"{self.potential!r} ** {self.beta}"


class Product(Potential):
    """phi = prod_k phi_k (log scores add). Token scores exist only if all parts have them."""

    def __init__(self, *potentials: Potential):
        flat: list[Potential] = []
        for p in potentials:
            flat.extend(p.potentials if isinstance(p, Product) else [p])
        if not flat:
            raise ValueError("Product needs at least one potential")
        self.potentials = flat
        self.has_prefix = any(p.has_prefix for p in flat)
        self.prefix_is_upper_bound = all(p.prefix_is_upper_bound for p in flat)

    def complete(self, x: Particles) -> Tensor:
        return sum(p.complete(x) for p in self.potentials)

    def prefix(self, x: Particles) -> Tensor:
        return sum(p.prefix(x) for p in self.potentials)

    def token_scores(self, x: Particles) -> Tensor | None:
        parts = [p.token_scores(x) for p in self.potentials]
        return None if any(s is None for s in parts) else sum(parts)

    def __repr__(self) -> str:
        return " * ".join(repr(p) for p in self.potentials)


class PerPrompt(Potential):
    """A different potential for each prompt of the batch: ``potentials[b]`` scores the
    rows of prompt b (e.g. different keywords per prompt). Token scores exist only if
    every part has them."""

    def __init__(self, potentials: Sequence[Potential]):
        self.potentials = list(potentials)
        if not self.potentials:
            raise ValueError("PerPrompt needs one potential per prompt")
        self.has_prefix = any(p.has_prefix for p in self.potentials)
        self.prefix_is_upper_bound = all(p.prefix_is_upper_bound for p in self.potentials)

    def _dispatch(self, x: Particles, method: str, shape: tuple[int, ...]) -> Tensor | None:
        out = torch.zeros((x.num_rows, *shape), dtype=torch.float64, device=x.device)
        for b in x.prompt_index.unique().tolist():
            if b >= len(self.potentials):
                raise ValueError(
                    f"PerPrompt has {len(self.potentials)} potentials but prompt {b} exists"
                )
            rows = x.prompt_index == b
            values = getattr(self.potentials[b], method)(x.select(rows))
            if values is None:
                return None
            out[rows] = values.to(out)
        return out

    def complete(self, x: Particles) -> Tensor:
        return self._dispatch(x, "complete", ())

    def prefix(self, x: Particles) -> Tensor:
        return self._dispatch(x, "prefix", ())

    def token_scores(self, x: Particles) -> Tensor | None:
        return self._dispatch(x, "token_scores", (x.vocab_size,))

    @property
    def forward_tokens(self) -> int:
        return sum(getattr(p, "forward_tokens", 0) for p in self.potentials)
