"""The CTL loss of one batch from its samples (:class:`llmsample.ctl.CTLTrainer` draws them).

    memo = MemoPotential(potential)        # values reused between sampler and loss
    loss = exact_last_token_loss(neg_scores, neg_logp, neg_tok, neg_len, memo, prompts,
                                 pos_psi, pos_w, pos_m, tokenizer=tok, eos=[eos], T=T,
                                 twisted=True)

Positives are [B, K, S] (log psi per step, log weights, mask); negatives are the head's
scores [B*M, S, V] of M draws per prompt. ``exact_last_token_loss`` sums every next token of
each running negative prefix exactly (``negatives='base'|'twisted'``); ``sampled_loss``
scores each draw at its sampled token and pools it with the positives
(``negatives='sampled'``); ``given_positives`` turns exact posterior samples into
positives (``positives='given'``). The estimator itself is :func:`llmsample.ctl.ctl_loss`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from llmsample.ctl.loss import ctl_loss
from llmsample.particles import Particles
from llmsample.potentials.base import Potential

__all__ = ["MemoPotential", "exact_last_token_loss", "given_positives", "sampled_loss"]


class MemoPotential(Potential):
    """``inner`` with its values memoized by (prompt row, tokens incl. EOS), so the loss
    reuses the EOS-column values the twisted sampler already computed."""

    def __init__(self, inner: Potential | None):
        self.inner = inner
        self.memo: dict[tuple[int, ...], float] = {}

    def complete(self, x: Particles) -> Tensor:
        out = torch.zeros(x.num_rows, dtype=torch.float64, device=x.device)
        if self.inner is None or x.num_rows == 0:
            return out
        keys = [
            (int(b), *row[:n].tolist())
            for b, row, n in zip(x.prompt_index.tolist(), x.tokens, x.lengths.tolist())
        ]
        todo = [r for r, key in enumerate(keys) if key not in self.memo]
        if todo:
            index = torch.tensor(todo, device=x.device)
            vals = self.inner.complete(x.select(index)).to(torch.float64).tolist()
            self.memo.update((keys[r], v) for r, v in zip(todo, vals))
        return torch.tensor([self.memo[k] for k in keys], dtype=torch.float64, device=x.device)


def sampled_loss(
    neg_scores, neg_tok, neg_len, memo, prompts, pos_psi, pos_w, pos_m, *, tokenizer, eos, T
):
    """``negatives='sampled'``: log Z_t from the draws of p at their sampled token
    (log phi where a draw completed at t), pooled with the positives (each positive
    set counted as K draws): log ((sum_m psi(y_m) + K sum_k w_k psi(y+_k)) / (M + K)).
    With the positives in the pool, the loss is bounded below by 0 per (prompt, step)."""
    B, K, S = pos_psi.shape
    M = neg_scores.shape[0] // B
    device = neg_scores.device
    steps = torch.arange(1, S + 1, device=device)
    gathered = neg_scores.gather(2, neg_tok[:, :S, None])[..., 0]  # [B*M, S]
    done = (neg_len <= S).nonzero()[:, 0]  # draws that complete within t = 1..S
    log_phi = torch.zeros(B * M, dtype=torch.float64, device=device)
    if done.numel():
        x = Particles(
            neg_tok[done],
            neg_len[done],
            torch.arange(B, device=device).repeat_interleave(M)[done],
            prompts.to(device),
            tokenizer,
            torch.as_tensor(eos, device=device),
            T,
            neg_scores.shape[-1],
        )
        log_phi[done] = memo.complete(x)
    neg_psi = torch.where(steps[None, :] == neg_len[:, None], log_phi[:, None], gathered)
    neg_mask = steps[None, :] <= neg_len[:, None]
    w = torch.log_softmax(pos_w.detach().double(), dim=1) + math.log(K)  # [B, K]
    pool_psi = torch.cat([neg_psi.view(B, M, S), pos_psi], dim=1)[..., None]  # [B, M+K, S, 1]
    pool_w = torch.cat([pos_w.new_zeros(B, M, dtype=torch.float64), w], dim=1)  # [B, M+K]
    return ctl_loss(
        pos_psi,
        pos_w,
        pos_m,
        pool_psi,
        torch.zeros_like(pool_psi),
        torch.cat([neg_mask.view(B, M, S), pos_m], dim=1),
        pool_w,
    )


def exact_last_token_loss(
    neg_scores,
    neg_logp,
    neg_tok,
    neg_len,
    memo,
    prompts,
    pos_psi,
    pos_w,
    pos_m,
    *,
    tokenizer,
    eos,
    T,
    twisted: bool,
):
    """``negatives='base'|'twisted'``: every next token of each running parent, EOS
    columns log phi (the last token summed exactly; see :func:`ctl_loss`); ``twisted``:
    the prefixes were drawn from q ∝ p·psi and are weighted by p/q."""
    B, K, S = pos_psi.shape
    M = neg_scores.shape[0] // B
    V = neg_scores.shape[-1]
    device = neg_scores.device
    steps = torch.arange(1, S + 1, device=device)
    index = torch.arange(B, device=device)
    neg_mask = steps[None, :] <= neg_len[:, None]  # [B*M, S] the parent x_<t is running
    eos_t = torch.as_tensor(eos, device=device)
    fill = torch.zeros(B * M, S, V, dtype=torch.float64, device=device)
    is_eos = torch.zeros(V, dtype=torch.bool, device=device)
    is_eos[eos_t] = True
    prompt_rows = index.repeat_interleave(M)
    for t in range(1, S + 1):
        rows = neg_mask[:, t - 1].nonzero()[:, 0]
        for e in eos:
            toks = torch.cat([neg_tok[rows, : t - 1], torch.full_like(rows, e)[:, None]], dim=1)
            x = Particles(
                toks,
                torch.full_like(rows, t),
                prompt_rows[rows],
                prompts.to(device),
                tokenizer,
                eos_t,
                T,
                V,
            )
            fill[rows, t - 1, e] = memo.complete(x)
    neg_scores = torch.where(is_eos, fill, neg_scores)
    neg_log_w = None
    if twisted:
        # (p/q)(x_<t) = prod_{s<t} p(x_s)/q(x_s), q ∝ p·psi as the sampler computed it
        log_q = torch.log_softmax(neg_logp + neg_scores, dim=-1).detach()
        nxt = neg_tok[:, : S - 1, None]
        lpq = (neg_logp[:, : S - 1].gather(2, nxt) - log_q[:, : S - 1].gather(2, nxt))[..., 0]
        real = steps[None, : S - 1] < neg_len[:, None]  # x_s is a real non-EOS token
        lpq = torch.where(real, lpq, 0.0)
        neg_log_w = torch.cat([lpq.new_zeros(B * M, 1), lpq.cumsum(1)], dim=1).view(B, M, S)
    return ctl_loss(
        pos_psi,
        pos_w,
        pos_m,
        neg_scores.view(B, M, S, V),
        neg_logp.view(B, M, S, V),
        neg_mask.view(B, M, S),
        neg_log_w,
    )


def given_positives(refs, potential, prompts, T: int, *, tokenizer, eos, vocab, device):
    """The given exact samples ``refs`` (one per prompt) as positives (K = 1, weight 1):
    tokens [B, T] (right-padded), log w [B, 1] and log phi [B]."""
    if any(len(r) > T or len(r) == 0 for r in refs):
        raise ValueError(f"references must hold 1..max_new_tokens={T} tokens")
    pad = prompts.pad_token_id
    tok = torch.full((len(refs), T), pad, dtype=torch.long, device=device)
    for b, r in enumerate(refs):
        tok[b, : len(r)] = torch.tensor(r, device=device)
    lengths = torch.tensor([len(r) for r in refs], device=device)
    eos_t = torch.as_tensor(eos, device=device)
    x = Particles(
        tok,
        lengths,
        torch.arange(len(refs), device=device),
        prompts.to(device),
        tokenizer,
        eos_t,
        T,
        vocab,
    )
    log_w = torch.zeros(len(refs), 1, dtype=torch.float64, device=device)
    if potential is None:
        return tok, log_w, torch.zeros(len(refs), dtype=torch.float64, device=device)
    return tok, log_w, potential.complete(x).to(dtype=torch.float64, device=device)
