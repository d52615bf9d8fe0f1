"""One output type for every sampler (SMC, importance sampling, ancestral, beam).

Weights are per prompt: ``log_weights[b]`` is normalized over the N particles of
prompt b, so ``sum_i exp(log_weights[b, i]) == 1`` unless every particle was
rejected (then the row is all ``-inf`` and ``log_z[b] == -inf``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["SamplingOutput"]


@dataclass
class SamplingOutput:
    """Samples of B prompts x N particles and their weights.

    Plain samplers (ancestral, beam) return uniform weights and ``log_z = None``:
    their draws are unweighted. ``log_potential`` is log phi of each final particle
    when a potential was given, whatever the method, so constraint rates compare.
    """

    method: str
    sequences: Tensor  # [B, N, P + T] prompt (left padded) + continuation, like generate
    prompt_length: int
    texts: list[list[str]]  # [B][N] decoded continuations, EOS stripped
    log_weights: Tensor  # [B, N] normalized per prompt (float64)
    log_weights_unnormalized: Tensor  # [B, N] final-epoch log weights
    log_z: Tensor | None  # [B] log evidence estimate
    ess: Tensor  # [B, S] ESS after reweighting at each step, before resampling
    resampled: Tensor  # [B, S] True where that step resampled
    log_potential: Tensor | None = None  # [B, N] log phi of each final particle
    num_forward_tokens: int = 0  # token positions pushed through the models
    extras: dict = field(default_factory=dict)

    @property
    def continuations(self) -> Tensor:
        """[B, N, T] generated token ids (padded after EOS)."""
        return self.sequences[..., self.prompt_length :]

    @property
    def num_particles(self) -> int:
        return self.sequences.shape[1]

    @property
    def resampling_steps(self) -> list[list[int]]:
        """For each prompt, the steps at which it resampled."""
        return [torch.nonzero(r).flatten().tolist() for r in self.resampled]

    def _check_alive(self, b: int, lw: Tensor) -> None:
        if torch.isinf(lw).all():
            raise ValueError(
                f"prompt {b}: every particle has weight 0 (the potential rejected all); "
                "nothing to sample. Use more particles or a twist."
            )

    def sample(self, k: int, seed: int | None = None) -> list[list[str]]:
        """k posterior draws per prompt, drawn with replacement by weight."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"sample(k): k must be an integer >= 1 draws per prompt, got {k!r}")
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        out = []
        for b, lw in enumerate(self.log_weights):
            self._check_alive(b, lw)
            idx = torch.multinomial(lw.exp().float(), k, replacement=True, generator=gen)
            out.append([self.texts[b][i] for i in idx.tolist()])
        return out

    def best(self) -> list[str]:
        """The highest-weight continuation of each prompt (best-of-N); a ValueError when
        the potential rejected every particle of a prompt (no continuation qualifies)."""
        out = []
        for b, lw in enumerate(self.log_weights):
            self._check_alive(b, lw)
            out.append(self.texts[b][int(lw.argmax())])
        return out
