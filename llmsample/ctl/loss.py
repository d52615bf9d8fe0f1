"""Contrastive twist learning (CTL, Zhao et al. 2024) for a :class:`~llmsample.TwistHead`.

**Objective.** Continuations end at EOS or after T tokens. For a step t = 1..T-1 let
Y_t be the prefixes that are still running after t tokens (no EOS yet) together with
the continuations that complete exactly at step t. On Y_t put

    sigma_t(y) ∝ p(y | c) psi*(y)          (sigma's marginal on Y_t)
    pi_t(y)    ∝ p(y | c) psi_t(y)         (what SMC with twist psi targets at step t)

with psi = phi on completed y (psi* is the optimal twist E_p[phi | y]). CTL minimizes

    L(psi) = sum_{t=1}^{T-1} KL(sigma_t || pi_t)
           = sum_t ( log Z_t(psi) - E_{sigma_t}[log psi_t(y)] ) + const,
    Z_t(psi) = sum_{y in Y_t} p(y | c) psi_t(y),

whose gradient is the contrast of positives and negatives

    grad L = sum_t ( E_{pi_t}[grad log psi_t] - E_{sigma_t}[grad log psi_t] ),

zero at psi = psi* (then pi_t = sigma_t for every t). Completed y carry phi, which the
head does not touch, so they pin psi's level: without them (running prefixes only)
L would not see a per-step constant in log psi. SMC with the base proposal does not
either (the engine's weights and resampling are invariant to it), but the locally
optimal proposal q ∝ p·psi weighs EOS (phi) against psi and does.

**Estimators** (per prompt, per step, :func:`ctl_loss`):

- *positives*: properly weighted samples of sigma (SMC or importance sampling with the
  current twist, or exact draws where a problem comes with one, e.g. synthetic
  infilling), weights self-normalized over the rows whose prefix lies in Y_t:
  E_{sigma_t}[log psi_t] ≈ sum_k w_k log psi_t(x^k_<=t).
- *negatives*, exact in the last token: write y = (x_<t, v) with x_<t running; then
  Z_t = sum_{x_<t} p(x_<t) sum_v p(v | x_<t) psi_t(x_<t, v), where the inner sum over
  the V next tokens is exact from the head's [V] scores (EOS columns: phi). The outer
  sum is an importance estimate over prefixes x^m_<t drawn from a proposal r:

      log Z_t ≈ log (1/M) sum_m (p/r)(x^m_<t) sum_v p(v | x^m_<t) psi_t(x^m_<t, v),

  whose gradient is the self-normalized E_{pi_t}[grad log psi_t] with the last token
  Rao-Blackwellized (the softmax over v of p·psi). ``negatives='twisted'`` draws
  x^m from r = q_psi ∝ p·psi token by token (the locally optimal proposal, no
  resampling; (p/r)(x_<t) = prod_{s<t} p/q is exact), which follows psi where it is
  large, so an overestimated psi is sampled and pushed back down. ``'base'`` draws from
  r = p: simpler, but regions p rarely visits are never contrasted and psi can drift
  up there (seen on the exact task with a constant learning rate: the objective first
  falls, then climbs back).
- *negatives, sampled* (``negatives='sampled'`` in the trainer): ancestral draws
  y_m ~ p scored at their sampled token only, pooled with the positives:
  log Z_t ≈ log ((sum_m psi(y_m) + K sum_k w_k psi(y+_k)) / (M + K)). This is a
  conditional (CSMC-like) estimate, biased upwards in expectation, so the loss bounds
  the objective from above and tends to it as M grows; it cannot run away (with one
  positive, each (prompt, step) term is >= -log(1 + M)), and it needs log phi once per draw rather
  than once per draw and step (the cost that matters for text potentials). Same
  function: pass the pool as ``neg_scores`` [B, M+K, S, 1] with ``neg_logp`` = 0.

The trainer (sampling positives and negatives, AdamW on the head, checkpoints) is
:mod:`llmsample.ctl.trainer`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from llmsample.hf.prompts import PromptBatch
from llmsample.hf.session import full_forward

__all__ = ["ctl_loss", "base_states", "lengths_of"]


def ctl_loss(
    pos_log_psi: Tensor,
    pos_log_w: Tensor,
    pos_mask: Tensor,
    neg_scores: Tensor,
    neg_logp: Tensor,
    neg_mask: Tensor,
    neg_log_w: Tensor | None = None,
) -> Tensor:
    """The CTL loss sum_t (log Z_t - E_sigma_t[log psi_t]), averaged over prompts.

    B prompts, K positives, M negatives, S = T - 1 steps, V tokens:

    - ``pos_log_psi`` [B, K, S]: log psi_t(x^k_<=t) (log phi where x^k completed at t).
    - ``pos_log_w`` [B, K]: log weights of the positives, properly weighted for sigma.
    - ``pos_mask`` [B, K, S]: x^k_<=t lies in Y_t (t <= the continuation's length).
    - ``neg_scores`` [B, M, S, V]: log psi_t(x^m_<t, v) of every next token v, log phi
      on completing (EOS) columns, as :meth:`Twist.next_token`.
    - ``neg_logp`` [B, M, S, V]: base log p(v | c, x^m_<t).
    - ``neg_mask`` [B, M, S]: the parent x^m_<t is running (t <= its length).
    - ``neg_log_w`` [B, M] or [B, M, S]: log (p/r)(x^m_<t) when the negatives' prefixes
      come from a proposal r other than p; None for ancestral draws from p.

    Weights are detached; gradients flow through ``pos_log_psi`` and ``neg_scores``.
    A (prompt, step) with no positive mass or no running negative is left out. The
    value is sum_t KL(sigma_t || pi_t) up to a psi-independent constant (and the noise
    of the estimates); its gradient vanishes at psi = psi* in expectation.
    """
    B, K, S = pos_log_psi.shape
    M = neg_scores.shape[1]
    if pos_log_w.shape != (B, K) or pos_mask.shape != (B, K, S):
        raise ValueError(
            f"positives: pos_log_psi {tuple(pos_log_psi.shape)}, pos_log_w "
            f"{tuple(pos_log_w.shape)} and pos_mask {tuple(pos_mask.shape)} do not agree"
        )
    if neg_scores.shape[:3] != (B, M, S) or neg_logp.shape != neg_scores.shape:
        raise ValueError(
            f"negatives: neg_scores {tuple(neg_scores.shape)} and neg_logp "
            f"{tuple(neg_logp.shape)} must both be [B={B}, M, S={S}, V]"
        )
    if neg_mask.shape != (B, M, S):
        raise ValueError(f"neg_mask must be [B, M, S] = {(B, M, S)}, got {tuple(neg_mask.shape)}")
    f = pos_log_psi.dtype
    ninf = torch.tensor(-math.inf, dtype=f, device=pos_log_psi.device)
    # positives: self-normalized weights over the rows in Y_t, per (prompt, step)
    lw = torch.where(pos_mask, pos_log_w.detach().to(f)[:, :, None], ninf)  # [B, K, S]
    norm = lw.logsumexp(dim=1, keepdim=True)  # [B, 1, S]
    has_pos = torch.isfinite(norm)[:, 0]  # [B, S]
    w = torch.where(torch.isfinite(norm), (lw - norm.clamp(min=-1e300)).exp(), 0.0)
    pos = (w * torch.where(w > 0, pos_log_psi, 0.0)).sum(dim=1)  # [B, S]
    # negatives: log (1/M) sum_m (p/r) sum_v p psi, the last token exact
    a = neg_logp.detach().to(f) + neg_scores.to(f)  # [B, M, S, V]
    if neg_log_w is not None:
        nlw = neg_log_w.detach().to(f)
        a = a + (nlw[:, :, None, None] if nlw.dim() == 2 else nlw[..., None])
    a = torch.where(neg_mask[..., None], a, ninf)
    has_neg = neg_mask.any(dim=1)  # [B, S]
    a = torch.where(has_neg[:, None, :, None], a, 0.0)  # no all -inf slice: finite grads
    log_z = a.logsumexp(dim=3).logsumexp(dim=1) - math.log(M)  # [B, S]
    valid = has_pos & has_neg & torch.isfinite(log_z)
    per = torch.where(valid, log_z - pos, 0.0)  # [B, S]
    return per.sum() / B


def lengths_of(tokens: Tensor, eos: Sequence[int]) -> Tensor:
    """Real continuation length of right-padded rows [R, T]: through the first EOS, else T."""
    is_eos = torch.isin(tokens, torch.as_tensor(list(eos), device=tokens.device))
    T = tokens.shape[1]
    return torch.where(is_eos.any(1), is_eos.long().argmax(1) + 1, T)


def base_states(
    model, prompts: PromptBatch, prompt_index: Tensor, tokens: Tensor, steps: int
) -> tuple[Tensor, Tensor]:
    """Last hidden state [R, steps, H] and next-token log p [R, steps, V] of the frozen
    ``model`` after prompt ``prompt_index[r]`` and the first j tokens of ``tokens[r]``,
    j = 0..steps-1 (one teacher-forced pass, no grad; tokens after a row's end are fed
    as they are and only reach later positions, which the caller masks)."""
    device = next(model.parameters()).device
    ctx = prompts.input_ids[prompt_index].to(device)
    ctx_mask = prompts.attention_mask[prompt_index].to(device)
    cont = tokens[:, : steps - 1].to(device)
    ids = torch.cat([ctx, cont], dim=1)
    mask = torch.cat([ctx_mask, torch.ones_like(cont)], dim=1)
    P = ctx.shape[1]
    with torch.no_grad():
        logits, h = full_forward(model, ids, mask, hidden=True)  # [R, L, V], [R, L, H]
    hidden = h[:, P - 1 : P - 1 + steps].float()
    logp = torch.log_softmax(logits[:, P - 1 : P - 1 + steps].float(), dim=-1)
    return hidden, logp
