"""Token-level potentials: a hard mask on token ids, with exact prefix and token scores.

    from llmsample.potentials import TokenMask

    phi = TokenMask(banned=[tok.convert_tokens_to_ids("!")])
    phi = TokenMask(allowed=digit_ids)   # EOS is always allowed

Being token-level, ``TokenMask`` scores every one-token extension at once
(``token_scores``), which makes the locally optimal proposal rejection-free.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
from torch import Tensor

from llmsample.particles import Particles
from llmsample.potentials.base import Potential

__all__ = ["TokenMask"]

NEG_INF = float("-inf")


class TokenMask(Potential):
    """Hard token-level constraint: only ``allowed`` token ids (or none of ``banned``).

    EOS is always allowed. Fully token-level, so it offers exact prefix scores and
    ``token_scores`` (the locally optimal proposal is then exact rejection-free).
    """

    has_prefix = True
    prefix_is_upper_bound = True  # prefix = complete, and a broken mask stays broken

    def __init__(self, allowed: Sequence[int] | None = None, banned: Sequence[int] | None = None):
        if (allowed is None) == (banned is None):
            raise ValueError("TokenMask needs exactly one of `allowed=` or `banned=`")
        self.allowed = None if allowed is None else _token_ids(allowed, "allowed")
        self.banned = None if banned is None else _token_ids(banned, "banned")
        if self.allowed is not None and not len(self.allowed):
            raise ValueError(
                "TokenMask(allowed=[]) allows no token but EOS; give at least one token id"
            )

    def _table(self, vocab: int, device) -> Tensor:
        """[V] bool lookup of allowed ids, built once per (vocab, device)."""
        key = (vocab, str(device))
        if getattr(self, "_key", None) != key:
            ids = self.allowed if self.allowed is not None else self.banned
            top = int(ids.max()) + 1 if len(ids) else 0
            table = torch.zeros(max(vocab, top), dtype=torch.bool)
            table[ids] = True
            self._cache = (table if self.allowed is not None else ~table).to(device)
            self._key = key
        return self._cache

    def _ok(self, tokens: Tensor, x: Particles) -> Tensor:
        ok = self._table(x.vocab_size, x.device)[tokens]
        return ok | (tokens[..., None] == x.eos_token_ids).any(-1)

    def complete(self, x: Particles) -> Tensor:
        pos = torch.arange(x.step, device=x.device)[None, :]
        ok = self._ok(x.tokens, x) | (pos >= x.lengths[:, None])
        return torch.where(ok.all(dim=1), 0.0, NEG_INF).to(torch.float64)

    prefix = complete

    def token_scores(self, x: Particles) -> Tensor | None:
        now = self.complete(x)  # [R]
        ok = self._ok(torch.arange(x.vocab_size, device=x.device), x)  # [V]
        return now[:, None] + torch.where(ok, 0.0, NEG_INF).to(torch.float64)[None, :]


def _token_ids(ids, name: str) -> Tensor:
    """A list of token ids as a long tensor: a TypeError for anything but integers (bools
    included), a ValueError for ids below 0 (they would index from the vocabulary's end)."""
    items = [ids] if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__") else ids
    out = []
    for i in items:
        if isinstance(i, bool) or not hasattr(i, "__index__"):
            raise TypeError(f"TokenMask `{name}=` must be a list of integer ids, got {i!r}")
        out.append(operator.index(i))
    if any(i < 0 for i in out):
        raise ValueError(f"TokenMask `{name}=` holds the negative id {min(out)}; ids are >= 0")
    return torch.tensor(out, dtype=torch.long)
