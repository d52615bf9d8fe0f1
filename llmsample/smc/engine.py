"""The SMC engine: propose -> reweight -> resample, over token prefixes.

For B prompts with N particles each (rows prompt-major), for t = 1..T:

1. **Propose.** Each unfinished row draws x_t ~ q(. | c, x_<t) from the proposal's
   full next-token distribution; exact log q of the drawn token is kept. With
   ``stop_guard``, q puts no mass on EOS where the potential rejects the reply as it
   stands (sigma has none there either), so fewer particles die at a hard constraint.
2. **Reweight.** log w += log p(x_t) - log q(x_t) + log psi_t(x_<=t) - log psi_{t-1}.
   A row that completes (x_t is EOS, or t = T) uses log phi instead of log psi_t,
   and from then on its tokens and weight are frozen. A run that never resamples
   (``ess_threshold=0``) drops the twist unless the proposal reads its token scores: the
   psi terms telescope away (:func:`llmsample.twists.effective_twist`).
3. **Resample (partial, among running rows only)**, after every ``resample_every``-th
   token (default: every token). Per prompt, let A be its rows
   still running. When ESS(w_A) / |A| < ``ess_threshold`` (and some running row has
   positive weight): draw |A| ancestors from A with probabilities proportional to w_i
   using the chosen scheme, copy them into the |A| running slots (KV cache included)
   and give each the weight (sum_{i in A} w_i) / |A|. Finished rows keep their slots,
   tokens and weights. A finished row carries phi while a running row carries psi_t
   (1 with no twist), two incomparable scales: letting them compete (resampling all N
   rows) would almost always drop finished rows whose phi is small next to psi, leaving
   a consistent but heavy-tailed estimate that badly underestimates log Z in practice.
4. **Step the model** on the new tokens (one batched forward of B*N rows). Stop
   as soon as every row has completed.

Resampling preserves the total weight (exactly for the running set, and in expectation
for every function of the particles: E[sum_j w'_j f(x'_j)] = sum_{i in A} w_i f(x_i)), so
weights are never reset and at the end log Z_b = logsumexp(log w_b) - log N: sum_i w_i is
unbiased for N Z(c). Output: particles with weights normalized per prompt. They are
*properly weighted* for

    sigma(x | c) = p(x | c) phi(x, c) / Z(c)

on continuations x of length <= T that end in EOS or are cut at T (a cut
continuation counts as complete, with probability p of its T tokens): for any f,
sum_i w_i f(x_i) is consistent for E_sigma[f], and exp(log Z) is unbiased for Z(c).
A prompt whose particles are all rejected gets ``log_z = -inf`` and a warning.

**Conditional SMC** (``reference=``): row 0 of each prompt is clamped to a given complete
continuation x*: it takes x*'s tokens instead of proposed ones (weighted with the same
incremental formula, log q of x*'s tokens included) and, while it runs, it is its own
ancestor at every resampling; the other running rows draw their ancestors iid from the
whole pool, row 0 included (conditional multinomial resampling). With x* ~ sigma,
E[log Z_hat] >= log Z: an upper bound, where plain SMC gives the lower bound
E[log Z_hat] <= log Z (see :mod:`llmsample.diagnostics.bounds`). In a conditional run every
resampling is multinomial, whatever ``cfg.resampling`` says (the conditional draws of the other
schemes are not implemented): it is the conditional SMC of multinomial SMC.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from llmsample.hf.prompts import PromptBatch
from llmsample.hf.session import LMSession, context_length, model_device, vocab_size
from llmsample.output import SamplingOutput
from llmsample.particles import Particles
from llmsample.potentials.base import Potential
from llmsample.proposals import LMProposal, Proposal
from llmsample.smc.conditional import Ancestry, ConditionalAncestry, FreeAncestry
from llmsample.smc.config import SMCConfig
from llmsample.smc.state import RunState
from llmsample.smc.steps import finalize, resample, reweight, score, score_rows
from llmsample.twists import NoTwist, Twist, effective_twist

__all__ = ["SMCConfig", "run_smc"]


def _guard_stop(logq, x: Particles, running, potential: Potential, eos) -> torch.Tensor:
    """``logq`` [R, V] with EOS removed (and renormalized) on the running rows whose reply,
    ended now, the potential rejects. sigma has no mass on those completions, so q stays
    > 0 wherever sigma > 0; the engine weighs the drawn token by this exact log q."""
    all_running, any_running = torch.stack([running.all(), running.any()]).tolist()
    if not any_running:
        return logq
    phi_now = score_rows(potential.complete, x, running, all_running, "potential.complete")
    reject = torch.zeros_like(running)
    reject[running] = torch.isneginf(phi_now)
    masked = logq.index_fill(1, eos, -math.inf)  # [R, V]
    ok = reject & torch.isfinite(masked.logsumexp(-1))  # another token can still be drawn
    return torch.where(ok[:, None], torch.log_softmax(masked, dim=-1), logq)


def _check_length(model, P: int, T: int) -> None:
    limit = context_length(model)
    if limit is not None and P + T > limit:
        raise ValueError(
            f"prompt length {P} + max_new_tokens {T} = {P + T} exceeds the model's context "
            f"of {limit} positions; shorten the prompt or lower max_new_tokens"
        )


def _propose(state: RunState, session, proposal, twist, potential, cfg, ancestry, gen):
    """Step 1: draw x_t for every row. Returns the tokens [R] (pad on finished rows),
    log p and log q of each [R] float64, and the twist's one-token scores [R, V] when the
    proposal uses them (else None)."""
    x = state.view()
    scores = twist.next_token(x) if proposal.uses_twist_scores else None  # [R, V]
    logp = session.logp  # [R, V]
    logq = proposal.log_probs(logp, x, scores)  # [R, V]
    if cfg.stop_guard and potential is not None and len(state.eos):
        logq = _guard_stop(logq, x, ~state.finished, potential, state.eos)
    new = torch.multinomial(logq.exp().float(), 1, generator=gen)[:, 0]  # [R]
    new = ancestry.clamp(new, state.t)
    new = torch.where(state.finished, state.prompts.pad_token_id, new)
    lp = logp.gather(1, new[:, None])[:, 0].double()
    lq = logq.gather(1, new[:, None])[:, 0].double()
    return new, lp, lq, scores


def run_smc(
    model,
    tokenizer,
    prompts: PromptBatch,
    potential: Potential | None,
    cfg: SMCConfig,
    *,
    proposal: Proposal | None = None,
    twist: Twist | None = None,
    eos_token_ids: list[int] | None = None,
    method: str = "smc",
    model_context=None,
    reference: Sequence[Sequence[int] | torch.Tensor] | None = None,
) -> SamplingOutput:
    """Run SMC for every prompt of ``prompts``; see the module docstring. ``model_context``
    (a context-manager factory) wraps every forward of ``model``, see :class:`LMSession`.

    ``reference``: one complete continuation per prompt (token ids ending with an EOS id,
    or exactly ``max_new_tokens`` ids without one), which makes this a conditional SMC run
    with row 0 of each prompt clamped to it (module docstring)."""
    proposal = proposal or LMProposal()
    twist = effective_twist(
        twist or NoTwist(),
        resamples=cfg.ess_threshold > 0,
        proposal_reads_scores=proposal.uses_twist_scores,
    )
    B, P = prompts.input_ids.shape
    N, T = cfg.num_particles, cfg.max_new_tokens
    _check_length(model, P, T)
    V = vocab_size(model)
    eos = torch.as_tensor(eos_token_ids or [], dtype=torch.long)
    device = model_device(model)
    ancestry: Ancestry = FreeAncestry(cfg.resampling)
    if reference is not None:
        pad = prompts.pad_token_id
        ancestry = ConditionalAncestry(reference, B, T, V, eos, pad, device)
    session = LMSession(model, prompts, N, context=model_context)
    prompts = prompts.to(device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.seed is not None else None
    proposal.start(prompts, N, V)
    twist.bind(potential)  # the run's potential, passed once
    twist.start(prompts, N)
    pieces = (session, proposal, twist)  # stateful per-row pieces: reordered, advanced
    potential_tokens_before = getattr(potential, "forward_tokens", 0)
    state = RunState.new(prompts, tokenizer, eos, N, T, V)

    for _ in tqdm(range(T), desc=method, disable=not cfg.progress, leave=False):
        new, lp, lq, scores = _propose(
            state, session, proposal, twist, potential, cfg, ancestry, gen
        )
        active = ~state.finished
        done_now = active & (torch.isin(new, state.eos) | (state.t == T - 1))
        state.append(new[:, None], active.long(), done_now)
        if scores is not None:  # the proposal's one-token scores are the new psi
            new_psi = scores.gather(1, new[:, None])[:, 0].double()
        else:
            new_psi = score(state, twist, potential, active & ~done_now, done_now)
        reweight(state, lp, lq, new_psi, active, done_now, ancestry, cfg.reweight)
        boundary = state.t % cfg.resample_every == 0  # K tokens between resampling steps
        index, all_done = resample(state, cfg, ancestry, gen, boundary)
        if index is not None:
            for piece in pieces:
                piece.reorder(index)
        if all_done:
            break
        for piece in pieces:
            piece.advance(state.tokens[:, -1])

    # model positions of every pass: the target's session, a model proposal's, a stateful
    # twist's own sessions (LearnedTwist, FlowTwist), and the potential's scoring
    forward = sum(getattr(piece, "forward_tokens", 0) for piece in pieces)
    forward += getattr(potential, "forward_tokens", 0) - potential_tokens_before
    return finalize(state, cfg, method, forward, potential is not None)
