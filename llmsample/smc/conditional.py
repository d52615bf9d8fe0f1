"""How each prompt's particles pick ancestors: freely, or conditioned on a reference.

The engine holds one :class:`Ancestry` per run and asks it three things: which token
each row takes (``clamp``), whether the weights it must keep are valid (``bad``), and
which ancestors a pool of running rows draws (``ancestors``).

- :class:`FreeAncestry` (plain SMC): rows keep their proposed tokens and ancestors come
  from the configured scheme (``multinomial``, ``systematic``, ...).
- :class:`ConditionalAncestry` (conditional SMC, ``reference=``): row 0 of each prompt is
  clamped to a complete continuation x*; it takes x*'s tokens instead of proposed ones
  (weighted like any other row, log q of x*'s tokens included) and, while it runs, is its
  own ancestor at every resampling; the other running rows draw their ancestors iid from
  the whole pool, row 0 included (conditional multinomial resampling). With x* ~ sigma,
  E[log Z_hat] >= log Z: the upper bound of :mod:`llmsample.diagnostics.bounds`. Every
  resampling is then multinomial, whatever the configured scheme says (the conditional
  draws of the other schemes are not implemented).

    anc = ConditionalAncestry(reference, B, T, V, eos, pad, device)
    new = anc.clamp(proposed, t)                         # [B*N]
    parents = anc.ancestors(log_w_pool, clamped, gen)    # [G, n] positions in each pool
"""

from __future__ import annotations

import torch
from torch import Tensor

from llmsample.smc.resampling import log_normalize, resample

__all__ = [
    "Ancestry",
    "FreeAncestry",
    "ConditionalAncestry",
    "reference_tokens",
    "conditional_multinomial",
]


class Ancestry:
    """Interface (see the module docstring)."""

    def clamp(self, new: Tensor, t: int) -> Tensor:
        """Tokens [B*N] the rows take at step ``t`` given the proposed ones."""
        return new

    def bad(self, log_w: Tensor) -> Tensor:
        """A 0-d bool tensor: the run's clamped weights went invalid (checked at the step's
        host sync, so no sync here)."""
        return torch.zeros((), dtype=torch.bool, device=log_w.device)

    def error(self, log_w: Tensor, t: int) -> Exception:
        raise NotImplementedError

    def ancestors(self, log_w: Tensor, clamped: Tensor, gen) -> Tensor:
        """Ancestors [G, n] (positions in each pool) for G pools of weights ``log_w``
        [G, n]; ``clamped`` [G] says whether slot 0 of a pool is the running reference."""
        raise NotImplementedError


class FreeAncestry(Ancestry):
    """Plain SMC: ancestors from ``scheme`` (:data:`llmsample.smc.resampling.SCHEMES`)."""

    def __init__(self, scheme: str):
        self.scheme = scheme

    def ancestors(self, log_w: Tensor, clamped: Tensor, gen) -> Tensor:
        return resample(log_w, self.scheme, gen)


class ConditionalAncestry(Ancestry):
    """Conditional SMC: row 0 of prompt b follows ``reference[b]`` (module docstring)."""

    def __init__(self, reference, B: int, T: int, V: int, eos: Tensor, pad: int, device):
        self.ref = reference_tokens(reference, B, T, V, eos, pad).to(device)  # [B, T]
        self.B = B

    def clamp(self, new: Tensor, t: int) -> Tensor:
        new.view(self.B, -1)[:, 0] = self.ref[:, t]  # the clamped rows (pad once ended)
        return new

    def bad(self, log_w: Tensor) -> Tensor:
        return ~torch.isfinite(log_w[:, 0]).all()

    def error(self, log_w: Tensor, t: int) -> Exception:
        bad = (~torch.isfinite(log_w[:, 0])).nonzero().flatten().tolist()
        return ValueError(
            f"the reference of prompt(s) {bad} got a weight of 0, +inf or NaN at step {t}: "
            "the target or the twist gives it probability 0, or the proposal cannot draw "
            "one of its tokens; a reference must be a draw from sigma"
        )

    def ancestors(self, log_w: Tensor, clamped: Tensor, gen) -> Tensor:
        return conditional_multinomial(log_w, clamped, gen)


def reference_tokens(reference, B: int, T: int, V: int, eos: Tensor, pad: int) -> Tensor:
    """Validate ``reference`` (B complete continuations) and return it as [B, T] token ids,
    padded with ``pad`` after each continuation's end."""
    if len(reference) != B:
        raise ValueError(f"reference has {len(reference)} continuations for {B} prompts")
    eos_set = set(eos.tolist())
    out = torch.full((B, T), pad, dtype=torch.long)
    for b, seq in enumerate(reference):
        seq = torch.as_tensor(seq).flatten().tolist()
        if not 1 <= len(seq) <= T or not all(isinstance(v, int) and 0 <= v < V for v in seq):
            raise ValueError(
                f"reference {b} must be 1 to max_new_tokens={T} token ids in [0, {V}), got {seq}"
            )
        ends = [i for i, v in enumerate(seq) if v in eos_set]
        if ends and ends[0] != len(seq) - 1:
            raise ValueError(
                f"reference {b} has tokens after its EOS at position {ends[0]}: {seq}; give "
                "the continuation up to and including its first EOS"
            )
        if not ends and len(seq) != T:
            raise ValueError(
                f"reference {b} is not a complete continuation: it neither ends with an EOS "
                f"id {sorted(eos_set)} nor has max_new_tokens={T} tokens ({len(seq)} given)"
            )
        out[b, : len(seq)] = torch.tensor(seq)
    return out


def conditional_multinomial(log_w: Tensor, clamped: Tensor, gen) -> Tensor:
    """Multinomial ancestors [G, n] for pools log_w [G, n], iid and unsorted; where
    ``clamped`` [G], slot 0 (the reference) keeps itself, so the other n - 1 are iid draws
    from the whole pool given it: exact conditional multinomial resampling."""
    w = log_normalize(log_w).exp()
    anc = torch.multinomial(w, log_w.shape[1], replacement=True, generator=gen)
    anc[:, 0] = torch.where(clamped, 0, anc[:, 0])
    return anc
