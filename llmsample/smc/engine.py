"""The SMC engine: propose -> reweight -> resample, over token prefixes.

For B prompts with N particles each (rows prompt-major), for t = 1..T:

1. **Propose.** Each unfinished row draws x_t ~ q(. | c, x_<t) from the proposal's
   full next-token distribution; exact log q of the drawn token is kept. With
   ``stop_guard``, q puts no mass on EOS where the potential rejects the reply as it
   stands (sigma has none there either), so fewer particles die at a hard constraint.
2. **Reweight.** log w += log p(x_t) - log q(x_t) + log psi_t(x_<=t) - log psi_{t-1}.
   A row that completes (x_t is EOS, or t = T) uses log phi instead of log psi_t,
   and from then on its tokens and weight are frozen.
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
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from llmsample.config import help_field
from llmsample.hf.prompts import PromptBatch
from llmsample.hf.session import LMSession, context_length, vocab_size
from llmsample.output import SamplingOutput
from llmsample.particles import Particles
from llmsample.potentials.core import Potential
from llmsample.proposals import LMProposal, Proposal
from llmsample.smc.resampling import SCHEMES, ess, log_normalize, resample
from llmsample.twists import NoTwist, Twist

__all__ = ["SMCConfig", "run_smc"]


@dataclass
class SMCConfig:
    """Knobs of the SMC engine (validated on construction)."""

    num_particles: int = help_field("particles N per prompt", 16)
    max_new_tokens: int = help_field("T: a continuation ends at EOS or after T tokens", 32)
    resampling: str = help_field("multinomial | stratified | systematic | residual", "systematic")
    ess_threshold: float = help_field(
        "resample a prompt's running particles when their ESS / their count < this (finished "
        "particles keep their weights); 0 never resamples (importance sampling), values > 1 "
        "resample at every step",
        0.5,
    )
    resample_every: int = help_field(
        "K: resampling is considered only after tokens K, 2K, ... (particles advance K "
        "tokens between resampling steps; the times are fixed in advance, so the weights "
        "stay exact)",
        1,
    )
    seed: int | None = help_field("seed for proposals and resampling; None uses torch's RNG", None)
    reweight: bool = help_field(
        "False returns plain draws from the proposal (uniform weights, no log Z)", True
    )
    progress: bool = help_field("show a progress bar over decoding steps", False)
    stop_guard: bool = help_field(
        "never propose EOS where the potential rejects the reply as it stands (phi = 0): "
        "sigma has no mass there, so the weights stay exact; costs one potential.complete "
        "call per step, so meant for cheap hard constraints",
        False,
    )

    def __post_init__(self):
        if not isinstance(self.num_particles, int) or self.num_particles < 1:
            raise ValueError(f"num_particles must be an integer >= 1, got {self.num_particles!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if self.resampling not in SCHEMES:
            raise ValueError(
                f"unknown resampling scheme {self.resampling!r}; choose from {sorted(SCHEMES)}"
            )
        k = self.resample_every
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"resample_every must be an integer >= 1, got {self.resample_every!r}")
        if not self.ess_threshold >= 0:
            raise ValueError(f"ess_threshold must be >= 0, got {self.ess_threshold}")


def _score(fn, x: Particles, rows: torch.Tensor, all_rows: bool, what: str) -> torch.Tensor:
    """fn on the selected rows (no copy when all rows are selected), shape-checked.
    NaN/+inf are checked by the caller at the step's single host sync."""
    x = x if all_rows else x.select(rows)
    values = fn(x).to(dtype=torch.float64, device=rows.device)
    if values.shape != (x.num_rows,):
        raise ValueError(f"{what} returned shape {tuple(values.shape)}, expected ({x.num_rows},)")
    return values


def _put(out: torch.Tensor, rows: torch.Tensor, values: torch.Tensor, all_rows: bool):
    if all_rows:
        return values
    out[rows] = values
    return out


def _guard_stop(logq, x: Particles, running, potential: Potential, eos) -> torch.Tensor:
    """``logq`` [R, V] with EOS removed (and renormalized) on the running rows whose reply,
    ended now, the potential rejects. sigma has no mass on those completions, so q stays
    > 0 wherever sigma > 0; the engine weighs the drawn token by this exact log q."""
    flags = torch.stack([running.all(), running.any()]).tolist()
    if not flags[1]:
        return logq
    phi_now = _score(potential.complete, x, running, flags[0], "potential.complete")
    reject = torch.zeros_like(running)
    reject[running] = torch.isneginf(phi_now)
    masked = logq.index_fill(1, eos, -math.inf)  # [R, V]
    ok = reject & torch.isfinite(masked.logsumexp(-1))  # another token can still be drawn
    return torch.where(ok[:, None], torch.log_softmax(masked, dim=-1), logq)


def _reference_tokens(reference, B: int, T: int, V: int, eos: torch.Tensor, pad: int):
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


def _conditional_multinomial(log_w: torch.Tensor, clamped: torch.Tensor, gen) -> torch.Tensor:
    """Multinomial ancestors [G, n] for pools log_w [G, n], iid and unsorted; where
    ``clamped`` [G], slot 0 (the reference) keeps itself, so the other n - 1 are iid draws
    from the whole pool given it: exact conditional multinomial resampling."""
    w = log_normalize(log_w).exp()
    anc = torch.multinomial(w, log_w.shape[1], replacement=True, generator=gen)
    anc[:, 0] = torch.where(clamped, 0, anc[:, 0])
    return anc


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
    twist = twist or NoTwist()
    B, P = prompts.input_ids.shape
    N, T = cfg.num_particles, cfg.max_new_tokens
    limit = context_length(model)
    if limit is not None and P + T > limit:
        raise ValueError(
            f"prompt length {P} + max_new_tokens {T} = {P + T} exceeds the model's context "
            f"of {limit} positions; shorten the prompt or lower max_new_tokens"
        )
    V = vocab_size(model)
    eos = torch.as_tensor(eos_token_ids or [], dtype=torch.long)
    ref = None
    if reference is not None:
        ref = _reference_tokens(reference, B, T, V, eos, prompts.pad_token_id)
    session = LMSession(model, prompts, N, context=model_context)
    device = session.device
    prompts = prompts.to(device)
    gen = None
    if cfg.seed is not None:
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
    eos = eos.to(device)
    ref = ref.to(device) if ref is not None else None
    proposal.start(prompts, N, V)
    twist.start(prompts, N)
    potential_tokens_before = getattr(potential, "forward_tokens", 0)

    R = B * N
    f64 = dict(dtype=torch.float64, device=device)
    log_w = torch.zeros(B, N, **f64)
    log_psi = torch.zeros(R, **f64)  # current twist value of each row (psi_0 = 1)
    log_phi = torch.zeros(R, **f64)  # log phi of each completed row
    finished = torch.zeros(R, dtype=torch.bool, device=device)
    lengths = torch.zeros(R, dtype=torch.long, device=device)
    prompt_index = torch.arange(B, device=device).repeat_interleave(N)
    ess_trace, resampled_trace = [], []

    row_numbers = torch.arange(R, device=device)  # what stateful twists index their state by

    def view(rows_tokens, rows_lengths) -> Particles:
        return Particles(
            rows_tokens, rows_lengths, prompt_index, prompts, tokenizer, eos, T, V, row_numbers
        )

    buf = torch.full((R, T), prompts.pad_token_id, dtype=torch.long, device=device)
    tokens = buf[:, :0]
    # NaN/+inf from twist, potential; a reference whose weight is not finite
    invalid = torch.zeros(3, dtype=torch.bool, device=device)

    for t in tqdm(range(T), desc=method, disable=not cfg.progress, leave=False):
        x = view(tokens, lengths)
        scores = twist.next_token(x) if proposal.uses_twist_scores else None  # [R, V]
        logp = session.logp  # [R, V]
        logq = proposal.log_probs(logp, x, scores)  # [R, V]
        if cfg.stop_guard and potential is not None and len(eos):
            logq = _guard_stop(logq, x, ~finished, potential, eos)
        new = torch.multinomial(logq.exp().float(), 1, generator=gen)[:, 0]  # [R]
        if ref is not None:
            new.view(B, N)[:, 0] = ref[:, t]  # the clamped rows (pad once they have ended)
        active = ~finished
        new = torch.where(active, new, prompts.pad_token_id)
        done_now = active & (torch.isin(new, eos) | (t == T - 1))
        buf[:, t] = new
        tokens = buf[:, : t + 1]  # [R, t+1], a view: no copy per step
        lengths = lengths + active.long()
        x = view(tokens, lengths)

        if scores is not None:
            new_psi = scores.gather(1, new[:, None])[:, 0].double()
        else:
            new_psi = torch.zeros(R, **f64)
            running = active & ~done_now
            if twist.informative or potential is not None:
                flags = torch.stack([running.all(), running.any(), done_now.any()]).tolist()
                all_running, any_running, any_done = flags
                if twist.informative and any_running:
                    vals = _score(twist.prefix, x, running, all_running, "twist.prefix")
                    invalid[0] |= ~(vals < math.inf).all()
                    new_psi = _put(new_psi, running, vals, all_running)
                if potential is not None and any_done:
                    vals = _score(potential.complete, x, done_now, False, "potential.complete")
                    invalid[1] |= ~(vals < math.inf).all()
                    new_psi = _put(new_psi, done_now, vals, False)
        log_phi = torch.where(done_now, new_psi, log_phi)

        if cfg.reweight:
            lp = logp.gather(1, new[:, None])[:, 0].double()
            lq = logq.gather(1, new[:, None])[:, 0].double()
            inc = lp - lq + new_psi - log_psi  # [R]
            alive = torch.isfinite(log_w.view(R))  # dead rows stay -inf, never NaN
            inc = torch.where(active & alive, inc, torch.zeros_like(inc))
            log_w = log_w + inc.view(B, N)
            if ref is not None:
                invalid[2] |= ~torch.isfinite(log_w[:, 0]).all()
        log_psi = torch.where(active, new_psi, log_psi)
        finished = finished | done_now

        ess_b = ess(log_w)  # [B] over all N rows: the reported trace
        ess_trace.append(ess_b)
        running_bn = ~finished.view(B, N)
        log_w_run = log_w.masked_fill(~running_bn, -math.inf)  # the resampling pool
        n_run = running_bn.sum(dim=1)  # [B]
        can = torch.isfinite(log_w_run.logsumexp(dim=1))  # some running row has weight > 0
        at_boundary = (t + 1) % cfg.resample_every == 0  # K tokens between resampling steps
        need = can & (ess(log_w_run) < cfg.ess_threshold * n_run) & (t < T - 1) & at_boundary
        resampled_trace.append(need)
        any_need, all_done, bad_twist, bad_potential, bad_ref = torch.cat(
            [torch.stack([need.any(), finished.all()]), invalid]
        ).tolist()
        if bad_twist or bad_potential:
            what = "twist.prefix" if bad_twist else "potential.complete"
            raise ValueError(f"{what} returned NaN or +inf; log scores must be finite or -inf")
        if bad_ref:
            bad = (~torch.isfinite(log_w[:, 0])).nonzero().flatten().tolist()
            raise ValueError(
                f"the reference of prompt(s) {bad} got a weight of 0, +inf or NaN at step {t}: "
                "the target or the twist gives it probability 0, or the proposal cannot draw "
                "one of its tokens; a reference must be a draw from sigma"
            )
        if any_need:
            index = torch.arange(R, device=device)
            # a prompt's running rows first, in order: its pool is the first |A| columns
            order = torch.sort(finished.view(B, N).long(), dim=1, stable=True).indices
            sizes = torch.where(need, n_run, 0)  # |A| of each prompt to resample, else 0
            for n in sizes.unique().tolist():  # prompts with the same |A| go in one batch
                if n == 0:
                    continue
                bs = (sizes == n).nonzero()  # [G, 1]
                slots = order[bs[:, 0], :n]  # [G, n] their running rows
                lw = log_w[bs, slots]  # [G, n]
                if ref is None:
                    anc = resample(lw, cfg.resampling, gen)  # [G, n] positions in the pool
                else:  # the reference, while running, is slot 0 of its pool
                    anc = _conditional_multinomial(lw, running_bn[bs[:, 0], 0], gen)
                index[bs * N + slots] = bs * N + slots.gather(1, anc)
                log_w[bs, slots] = lw.logsumexp(dim=1, keepdim=True) - math.log(n)
            buf, lengths = buf[index], lengths[index]
            tokens = buf[:, : t + 1]
            finished, log_psi, log_phi = finished[index], log_psi[index], log_phi[index]
            session.reorder(index)
            proposal.reorder(index)
            twist.reorder(index)
        if all_done:
            break
        session.step(tokens[:, -1])
        proposal.advance(tokens[:, -1])
        twist.advance(tokens[:, -1])

    log_z = log_w.logsumexp(dim=1) - math.log(N)
    dead = torch.isinf(log_z)
    if cfg.reweight and dead.any():
        bad = dead.nonzero().flatten().tolist()
        shown = ", ".join(map(str, bad[:10])) + (
            f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        )
        warnings.warn(
            f"the potential rejected every particle of prompt(s) {shown}: log_z = -inf. "
            "More particles, a twist, or a softer potential may help.",
            stacklevel=3,
        )
    # model positions of every pass: the target's session, a model proposal's, a stateful
    # twist's own sessions (LearnedTwist, FlowTwist), and the potential's scoring
    forward = session.forward_tokens + getattr(proposal, "forward_tokens", 0)
    forward += getattr(twist, "forward_tokens", 0)
    forward += getattr(potential, "forward_tokens", 0) - potential_tokens_before
    seq = torch.cat([prompts.input_ids.repeat_interleave(N, dim=0), tokens], dim=1)
    final = Particles(tokens, lengths, prompt_index, prompts, tokenizer, eos, T, V)
    texts = final.texts() if tokenizer is not None else [""] * R  # no tokenizer: ids only
    uniform = torch.full((B, N), -math.log(N), dtype=torch.float64)
    return SamplingOutput(
        method=method,
        sequences=seq.view(B, N, -1).cpu(),
        prompt_length=P,
        texts=[texts[b * N : (b + 1) * N] for b in range(B)],
        log_weights=log_normalize(log_w).cpu() if cfg.reweight else uniform,
        log_weights_unnormalized=log_w.cpu()
        if cfg.reweight
        else torch.zeros(B, N, dtype=torch.float64),
        log_z=log_z.cpu() if cfg.reweight else None,
        ess=torch.stack(ess_trace, dim=1).cpu(),
        resampled=torch.stack(resampled_trace, dim=1).cpu(),
        log_potential=log_phi.view(B, N).cpu() if potential is not None else None,
        num_forward_tokens=int(forward),
    )
