"""Proposals q(x_t | c, x_<t): sample the next token and return its exact log q.

Every proposal returns a full next-token log-distribution [R, V]; the engine samples
from it and uses ``log q`` of the sampled token in the weights, so truncation
(top-k/top-p) and tempering are corrected exactly.

- :class:`LMProposal`: the base LM itself, optionally tempered/top-k/top-p, and
  optionally reshaped by a per-step ``logits_hook`` (e.g. transformers logits processors:
  :mod:`llmsample.hf.decoding`); log q is the normalized hooked distribution, so exact.
- :class:`ModelProposal`: another causal LM that shares the tokenizer (e.g. a
  GFlowNet-tuned adapter), with its own KV cache kept in step with the particles.
- :class:`LocallyOptimal`: q ∝ p · psi_t(x_<t, v) over all v at once, from a twist
  that can score every next token (``Twist.next_token``). With the exact twist this
  makes every particle's weight identical, so ``log Z`` is exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from llmsample.hf.prompts import PromptBatch
from llmsample.hf.session import LMSession, vocab_size
from llmsample.particles import Particles

__all__ = ["Proposal", "LMProposal", "ModelProposal", "LocallyOptimal", "truncate", "LogitsHook"]

# (next-token log-probs [R, V], the particles so far) -> log scores [R, V], any shift
LogitsHook = Callable[[Tensor, Particles], Tensor]


def truncate(
    logp: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> Tensor:
    """Exact log q of the tempered, top-k, then top-p truncated distribution. [R, V]."""
    logq = logp if temperature == 1.0 else torch.log_softmax(logp / temperature, dim=-1)
    if top_k is not None and top_k < logq.shape[-1]:
        kth = logq.topk(top_k, dim=-1).values[..., -1:]  # [R, 1]
        logq = torch.log_softmax(logq.masked_fill(logq < kth, float("-inf")), dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_lq, order = logq.sort(dim=-1, descending=True)
        probs = sorted_lq.exp()
        before = probs.cumsum(-1) - probs  # mass strictly before each token
        drop_sorted = before >= top_p  # always keeps the top token
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logq = torch.log_softmax(logq.masked_fill(drop, float("-inf")), dim=-1)
    return logq


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not (temperature > 0 and math.isfinite(temperature)):  # NaN fails both
        raise ValueError(f"temperature must be > 0 and finite, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


class Proposal:
    """Interface. Stateful proposals (own model, own cache) use the three hooks."""

    uses_twist_scores: bool = False

    def start(self, prompts: PromptBatch, num_particles: int, base_vocab: int) -> None:
        """Called once before the first step."""

    def advance(self, tokens: Tensor) -> None:
        """Called after every row appended ``tokens`` ([R])."""

    def reorder(self, index: Tensor) -> None:
        """Called on resampling: row r becomes old row ``index[r]``."""

    def log_probs(self, base_logp: Tensor, x: Particles, twist_scores: Tensor | None) -> Tensor:
        """Normalized next-token log q, [R, V]. The default is the base LM."""
        return base_logp


def _hooked(hook: LogitsHook | None, logp: Tensor, x: Particles) -> Tensor:
    """log_softmax(hook(logp, x)). A row the hook leaves with no finite score (generate would
    fail on it) keeps ``logp``: the engine weighs by the log q returned, so it stays exact."""
    if hook is None:
        return logp
    scores = hook(logp, x).float()
    if scores.shape != logp.shape:
        raise ValueError(f"logits_hook returned {tuple(scores.shape)}, not {tuple(logp.shape)}")
    logq = torch.log_softmax(scores, dim=-1)
    return torch.where(torch.isnan(logq).any(-1, keepdim=True), logp, logq)


class LMProposal(Proposal):
    """The base LM, optionally tempered / top-k / top-p (exact truncated log q).

    ``logits_hook(logp, x)`` reshapes the next-token scores first (before tempering and
    truncation): it gets the normalized log-probs [R, V] and the particles so far and
    returns log scores; q is their softmax, so log q stays exact. It must be a function of
    its inputs only: rows are reordered by resampling between calls.
    """

    def __init__(
        self,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        logits_hook: LogitsHook | None = None,
    ):
        _check_sampling(temperature, top_k, top_p)
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.logits_hook = logits_hook

    def log_probs(self, base_logp: Tensor, x: Particles, twist_scores: Tensor | None) -> Tensor:
        logp = _hooked(self.logits_hook, base_logp, x)
        return truncate(logp, self.temperature, self.top_k, self.top_p)

    def __repr__(self) -> str:
        return f"LMProposal(temperature={self.temperature}, top_k={self.top_k}, top_p={self.top_p})"


class ModelProposal(LMProposal):
    """Another causal LM sharing the tokenizer (e.g. a LoRA policy) as the proposal.

    A peft model runs as it is, adapter on. When the target is that model's own base
    (the same peft model, or ``get_base_model()``), ``smc_generate`` runs the target's
    forwards with the adapter disabled, so the weights use p_base.
    """

    def __init__(
        self,
        model,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        logits_hook: LogitsHook | None = None,
    ):
        super().__init__(temperature, top_k, top_p, logits_hook)
        self.model = model
        self.session: LMSession | None = None

    def start(self, prompts: PromptBatch, num_particles: int, base_vocab: int) -> None:
        own = vocab_size(self.model)
        if own != base_vocab:
            raise ValueError(
                f"proposal model vocabulary size {own} does not match the base model's "
                f"{base_vocab}; a proposal model must share the base model's tokenizer"
            )
        self.session = LMSession(self.model, prompts, num_particles)

    def advance(self, tokens: Tensor) -> None:
        self.session.step(tokens)

    def reorder(self, index: Tensor) -> None:
        self.session.reorder(index)

    def log_probs(self, base_logp: Tensor, x: Particles, twist_scores: Tensor | None) -> Tensor:
        own = _hooked(self.logits_hook, self.session.logp.to(base_logp.device), x)
        return truncate(own, self.temperature, self.top_k, self.top_p)

    @property
    def forward_tokens(self) -> int:
        return 0 if self.session is None else self.session.forward_tokens


class LocallyOptimal(Proposal):
    """q(v) ∝ p(v|.) psi(x_<t, v), from the twist's next-token scores.

    Rows where no token has positive score (a dead end) fall back to p; their weight
    then becomes zero through the twist, never NaN. At the last step (every token
    completes a row) a twist may return no scores (``LearnedTwist(exact_last_step=False)``):
    that token is drawn from p, and the engine weighs it by the potential as for any
    proposal.
    """

    uses_twist_scores = True

    def log_probs(self, base_logp: Tensor, x: Particles, twist_scores: Tensor | None) -> Tensor:
        if twist_scores is None and x.step == x.max_new_tokens - 1:
            return base_logp
        if twist_scores is None:
            raise ValueError(
                "the locally optimal proposal needs a twist that scores every next token "
                "(the default twist of a token-level potential such as TokenMask, not twist='none')"
            )
        joint = base_logp.double() + twist_scores  # [R, V]
        logq = torch.log_softmax(joint, dim=-1)
        dead = torch.isinf(joint.logsumexp(-1, keepdim=True))  # [R, 1]
        return torch.where(dead, base_logp.double(), logq)  # float64: exact weights
