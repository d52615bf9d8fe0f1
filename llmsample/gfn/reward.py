"""The GFlowNet reward log R(x|c) = log p_base(x|c) + log phi(x,c), and policy diagnostics.

    terms = log_rewards(policy, tok, prompts, ro, potential, stop_ids, prefixes=True)
    stats = policy_diagnostics(policy, tok, ["ROMEO:"], potential, num_samples=64,
                               max_new_tokens=20, stop_ids=[eos])

p_base is the policy's own base model with the LoRA adapter disabled (no second copy).
``base_in_reward=False`` drops it (log R = log phi: e.g. a uniform target).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from llmsample.gfn.rollout import Rollouts, sample_rollouts
from llmsample.hf.adapters import BaseView, adapter_off  # BaseView: re-exported, its old home
from llmsample.hf.prompts import PromptBatch, encode_prompts
from llmsample.hf.session import teacher_force, vocab_size
from llmsample.particles import Particles
from llmsample.potentials.base import Potential

__all__ = ["BaseView", "RewardTerms", "log_rewards", "policy_diagnostics"]


@dataclass
class RewardTerms:
    log_reward: Tensor  # [R] float64, untempered
    stop_reward: Tensor | None  # [R, T+1] log R of x_1:i followed by the stop token
    stop_valid: Tensor | None  # [R, T+1] bool: prefix positions i = 0..n of each row


def _phi(potential, tokenizer, prompts, tokens, lengths, prompt_index, stop_ids, V) -> Tensor:
    if potential is None:
        return torch.zeros(tokens.shape[0], dtype=torch.float64)
    x = Particles(
        tokens,
        lengths,
        prompt_index,
        prompts,
        tokenizer,
        torch.as_tensor(stop_ids),
        tokens.shape[1],
        V,
    )
    return potential.complete(x).double().cpu()


@torch.no_grad()
def log_rewards(
    policy,
    tokenizer,
    prompts: PromptBatch,
    ro: Rollouts,
    potential: Potential | None,
    stop_ids: list[int],
    *,
    base_in_reward: bool = True,
    prefixes: bool = False,
) -> RewardTerms:
    """log R of every rollout (one base-model pass with the adapter disabled).

    With ``prefixes`` (modified SubTB; needs a single stop token) also log R of every
    prefix x_1:i terminated by the stop token, i = 0..n (n = non-stop tokens), and for a
    row cut at T, log R of the row itself at i = T.
    """
    V = vocab_size(policy)
    ctx_ids = prompts.input_ids[ro.prompt_index]
    ctx_mask = prompts.attention_mask[ro.prompt_index]
    if base_in_reward:
        with adapter_off(policy)():
            tf = teacher_force(
                policy,
                ctx_ids,
                ctx_mask,
                ro.tokens,
                ro.mask.long(),
                stop_ids=stop_ids if prefixes else None,
            )
        tok = tf.token_logp.double().cpu()  # [R, T]
        stop_lp = tf.stop_logp.double().cpu() if prefixes else None
    else:
        tok = torch.zeros(ro.tokens.shape, dtype=torch.float64)
        stop_lp = torch.zeros(ro.tokens.shape[0], ro.tokens.shape[1] + 1, dtype=torch.float64)
    log_phi = _phi(
        potential, tokenizer, prompts, ro.tokens, ro.lengths, ro.prompt_index, stop_ids, V
    )
    log_r = tok.sum(1) + log_phi
    if not prefixes:
        return RewardTerms(log_r, None, None)
    R, T = ro.tokens.shape
    n = ro.lengths - ro.stopped.long()  # non-stop tokens of each row
    valid = torch.arange(T + 1)[None, :] <= n[:, None]  # [R, T+1]
    rows, cols = valid[:, :T].nonzero(as_tuple=True)  # prefixes that stop with the token
    pre = torch.full((len(rows), T), prompts.pad_token_id, dtype=torch.long)
    pre = torch.where(torch.arange(T)[None, :] < cols[:, None], ro.tokens[rows], pre)
    pre[torch.arange(len(rows)), cols] = stop_ids[0]
    phi_pre = _phi(potential, tokenizer, prompts, pre, cols + 1, ro.prompt_index[rows], stop_ids, V)
    cum = torch.nn.functional.pad(tok.cumsum(1), (1, 0))  # [R, T+1] log p_base(x_1:i)
    stop_r = torch.zeros(R, T + 1, dtype=torch.float64)
    stop_r[rows, cols] = cum[rows, cols] + stop_lp[rows, cols] + phi_pre
    cut = ~ro.stopped & (n == T)
    stop_r[cut, T] = cum[cut, T] + log_phi[cut]
    return RewardTerms(log_r, stop_r, valid)


@torch.no_grad()
def policy_diagnostics(
    policy,
    tokenizer,
    prompts: list[str],
    potential: Potential | None,
    *,
    num_samples: int,
    max_new_tokens: int,
    stop_ids: list[int],
    base_in_reward: bool = True,
    seed: int = 0,
    chat: bool = False,
) -> dict:
    """How close q is to sigma, from ``num_samples`` policy samples per prompt:

    - ``log_z_is``: mean over prompts of log mean_k R(x_k)/q(x_k), an unbiased-in-Z
      importance estimate (a stochastic lower bound on log Z);
    - ``ess_frac``: mean over prompts of ESS(R/q) / K, 1 when q = sigma;
    - ``elbo``: mean of log R - log q (<= log Z; the gap is KL(q||sigma));
    - ``log_reward``, ``unique`` (distinct sequences / K).
    """
    batch = encode_prompts(tokenizer, prompts, chat=chat)  # chat: user messages, templated
    gen = torch.Generator(device=next(policy.parameters()).device).manual_seed(seed)
    ro = sample_rollouts(policy, batch, num_samples, max_new_tokens, stop_ids, generator=gen)
    ro = Rollouts(*(getattr(ro, f).cpu() for f in Rollouts.__dataclass_fields__))
    ctx = batch.input_ids[ro.prompt_index], batch.attention_mask[ro.prompt_index]
    log_q = teacher_force(policy, *ctx, ro.tokens, ro.mask.long()).token_logp.sum(1).double()
    log_r = log_rewards(
        policy, tokenizer, batch, ro, potential, stop_ids, base_in_reward=base_in_reward
    ).log_reward
    lw = (log_r - log_q.cpu()).view(len(prompts), num_samples)  # [B, K]
    log_z = lw.logsumexp(1) - math.log(num_samples)
    ess = torch.exp(2 * lw.logsumexp(1) - (2 * lw).logsumexp(1)).nan_to_num(0.0)  # 0 if R = 0
    seqs = ro.sequences()
    uniq = [
        len(set(seqs[b * num_samples : (b + 1) * num_samples])) / num_samples
        for b in range(len(prompts))
    ]
    return dict(
        log_z_is=float(log_z.mean()),
        ess_frac=float((ess / num_samples).mean()),
        elbo=float(lw.mean()),
        log_reward=float(log_r.mean()),
        unique=sum(uniq) / len(uniq),
    )
