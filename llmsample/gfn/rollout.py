"""Rollouts for GFlowNet training: sampled without autograd, using the KV cache.

    ro = sample_rollouts(policy, prompts, num_samples=8, max_new_tokens=20, stop_ids=[eos])

The exploration distribution is (1 - eps) softmax(logits / temperature) + eps / V. It
only chooses which sequences to train on: the losses score them under the untempered
policy in a separate teacher-forced pass, so any exploration is valid off-policy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from llmsample.hf.prompts import PromptBatch
from llmsample.hf.session import LMSession

__all__ = ["Rollouts", "sample_rollouts", "rollouts_from_sequences", "cat_rollouts"]


@dataclass
class Rollouts:
    """R complete continuations. A row ends with a stop token or is cut at T tokens."""

    prompt_index: Tensor  # [R] index into the PromptBatch
    tokens: Tensor  # [R, T] right-padded with the pad id
    lengths: Tensor  # [R] tokens, the stop token included
    stopped: Tensor  # [R] bool: ended with a stop token (else cut at T)

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]

    @property
    def mask(self) -> Tensor:
        return torch.arange(self.tokens.shape[1], device=self.tokens.device) < self.lengths[:, None]

    def sequences(self) -> list[tuple[int, ...]]:
        return [tuple(r[:n]) for r, n in zip(self.tokens.tolist(), self.lengths.tolist())]


@torch.no_grad()
def sample_rollouts(
    policy,
    prompts: PromptBatch,
    num_samples: int,
    max_new_tokens: int,
    stop_ids: list[int],
    *,
    temperature: float = 1.0,
    epsilon: float = 0.0,
    generator: torch.Generator | None = None,
) -> Rollouts:
    """``num_samples`` continuations per prompt (rows prompt-major), one cached forward
    per step; finished rows keep stepping on padding until every row is done."""
    if temperature <= 0 or not 0.0 <= epsilon <= 1.0:
        raise ValueError(
            f"need temperature > 0 and 0 <= epsilon <= 1, got {temperature}, {epsilon}"
        )
    B, K, T = prompts.size, num_samples, max_new_tokens
    session = LMSession(policy, prompts, K)
    device = session.device
    R = B * K
    stop = torch.as_tensor(stop_ids, device=device)
    tokens = torch.full((R, T), prompts.pad_token_id, dtype=torch.long, device=device)
    lengths = torch.zeros(R, dtype=torch.long, device=device)
    done = torch.zeros(R, dtype=torch.bool, device=device)
    for t in range(T):
        logq = torch.log_softmax(session.logp / temperature, dim=-1)  # [R, V]
        if epsilon > 0:
            uniform = torch.full_like(logq, -math.log(logq.shape[-1]))
            logq = torch.logaddexp(logq + math.log1p(-epsilon), uniform + math.log(epsilon))
        new = torch.multinomial(logq.exp(), 1, generator=generator)[:, 0]  # [R]
        new = torch.where(done, prompts.pad_token_id, new)
        tokens[:, t] = new
        lengths += (~done).long()
        done = done | torch.isin(new, stop)
        if bool(done.all()) or t == T - 1:
            break
        session.step(new)
    index = torch.arange(B, device=device).repeat_interleave(K)
    last = tokens.gather(1, (lengths - 1).clamp(min=0)[:, None])[:, 0]
    return Rollouts(index, tokens, lengths, torch.isin(last, stop))


def rollouts_from_sequences(
    seqs: list[tuple[int, ...]],
    prompt_index: list[int],
    max_new_tokens: int,
    stop_ids: list[int],
    pad_token_id: int,
    device: torch.device | str = "cpu",
) -> Rollouts:
    """Pack token tuples (e.g. from a replay buffer) into :class:`Rollouts`."""
    tokens = torch.full((len(seqs), max_new_tokens), pad_token_id, dtype=torch.long)
    for r, s in enumerate(seqs):
        tokens[r, : len(s)] = torch.tensor(s, dtype=torch.long)
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    stopped = torch.tensor([len(s) > 0 and s[-1] in stop_ids for s in seqs], dtype=torch.bool)
    return Rollouts(
        torch.tensor(prompt_index, dtype=torch.long, device=device),
        tokens.to(device),
        lengths.to(device),
        stopped.to(device),
    )


def cat_rollouts(parts: list[Rollouts]) -> Rollouts:
    """Concatenate rollouts row-wise (same T)."""
    return Rollouts(
        *(torch.cat([getattr(p, f) for p in parts]) for f in Rollouts.__dataclass_fields__)
    )
