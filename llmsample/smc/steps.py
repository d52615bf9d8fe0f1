"""The backend-free steps of SMC: score, reweight, resample, finalize.

An engine (:mod:`llmsample.smc.engine` on a Hugging Face model, :mod:`llmsample.smc.vllm`
on vLLM) proposes tokens its own way, appends them to the :class:`RunState`, then calls

1. :func:`score`: log psi of each row's new prefix (the twist on running rows, the
   potential's log phi on rows that just completed);
2. :func:`reweight`: log w += log p - log q + log psi_new - log psi_old over the new tokens
   (log p and log q summed over them), frozen once a row has completed;
3. :func:`resample`: at a boundary, partial resampling among each prompt's running rows
   when their ESS is low; returns the ancestor index the engine passes to every stateful
   piece's ``reorder`` (or None);
4. :func:`finalize`: normalized weights, log Z per prompt, texts: a
   :class:`~llmsample.output.SamplingOutput`.

The module docstring of :mod:`llmsample.smc.engine` gives the algorithm and what its
output is properly weighted for.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from llmsample.output import SamplingOutput
from llmsample.particles import Particles
from llmsample.potentials.base import Potential
from llmsample.smc.conditional import Ancestry
from llmsample.smc.config import SMCConfig
from llmsample.smc.resampling import ess, log_normalize
from llmsample.smc.state import RunState
from llmsample.twists import Twist

__all__ = ["score_rows", "score", "reweight", "resample", "finalize"]


def score_rows(fn, x: Particles, rows: Tensor, all_rows: bool, what: str) -> Tensor:
    """fn on the selected rows (no copy when all rows are selected), shape-checked, [|rows|]
    float64. NaN/+inf are checked by the caller at the step's single host sync."""
    x = x if all_rows else x.select(rows)
    values = fn(x).to(dtype=torch.float64, device=rows.device)
    if values.shape != (x.num_rows,):
        raise ValueError(f"{what} returned shape {tuple(values.shape)}, expected ({x.num_rows},)")
    return values


def _put(out: Tensor, rows: Tensor, values: Tensor, all_rows: bool) -> Tensor:
    if all_rows:
        return values
    out[rows] = values
    return out


def score(
    state: RunState, twist: Twist, potential: Potential | None, running: Tensor, done_now: Tensor
) -> Tensor:
    """log psi [R] of every row's prefix as it now stands: ``twist.prefix`` on the
    ``running`` rows, ``potential.complete`` (log phi) on the ``done_now`` rows, 0 elsewhere
    (and everywhere the twist is uninformative). One host sync, and only when needed."""
    new_psi = torch.zeros(state.R, dtype=torch.float64, device=state.device)
    if not (twist.informative or potential is not None):
        return new_psi
    x = state.view()
    all_running, any_running, any_done = torch.stack(
        [running.all(), running.any(), done_now.any()]
    ).tolist()
    if twist.informative and any_running:
        vals = score_rows(twist.prefix, x, running, all_running, "twist.prefix")
        state.invalid[0] |= ~(vals < math.inf).all()
        new_psi = _put(new_psi, running, vals, all_running)
    if potential is not None and any_done:
        vals = score_rows(potential.complete, x, done_now, False, "potential.complete")
        state.invalid[1] |= ~(vals < math.inf).all()
        new_psi = _put(new_psi, done_now, vals, False)
    return new_psi


def reweight(
    state: RunState,
    lp: Tensor,
    lq: Tensor,
    new_psi: Tensor,
    active: Tensor,
    done_now: Tensor,
    ancestry: Ancestry,
    weighted: bool = True,
) -> None:
    """log w += lp - lq + new_psi - log psi on the rows that were ``active`` (all [R],
    float64; lp and lq are log p and log q of the rows' new tokens, summed); completed rows
    keep log phi. ``weighted=False`` leaves log w alone (plain draws from the proposal)."""
    state.log_phi = torch.where(done_now, new_psi, state.log_phi)
    if weighted:
        inc = lp - lq + new_psi - state.log_psi  # [R]
        alive = torch.isfinite(state.log_w.view(-1))  # dead rows stay -inf, never NaN
        inc = torch.where(active & alive, inc, torch.zeros_like(inc))
        state.log_w = state.log_w + inc.view(state.B, state.N)
        state.invalid[2] |= ancestry.bad(state.log_w)
    state.log_psi = torch.where(active, new_psi, state.log_psi)


def resample(
    state: RunState, cfg: SMCConfig, ancestry: Ancestry, gen, boundary: bool
) -> tuple[Tensor | None, bool]:
    """Partial resampling (the engine's module docstring, step 3) at a ``boundary``, with
    the step's one host sync; raises on invalid scores. Returns the ancestor index [R] (row
    r is now old row index[r], already applied to ``state``) or None, and whether every
    row has finished."""
    B, N, R = state.B, state.N, state.R
    log_w, finished = state.log_w, state.finished
    state.ess_trace.append(ess(log_w))  # [B] over all N rows: the reported trace
    running_bn = ~finished.view(B, N)
    log_w_run = log_w.masked_fill(~running_bn, -math.inf)  # the resampling pool
    n_run = running_bn.sum(dim=1)  # [B]
    # some running row has weight > 0 (none is left once a prompt's rows reach T)
    can = torch.isfinite(log_w_run.logsumexp(dim=1))
    need = can & (ess(log_w_run) < cfg.ess_threshold * n_run) & boundary
    state.resampled_trace.append(need)
    any_need, all_done, bad_twist, bad_potential, bad_ref = torch.cat(
        [torch.stack([need.any(), finished.all()]), state.invalid]
    ).tolist()
    if bad_twist or bad_potential:
        what = "twist.prefix" if bad_twist else "potential.complete"
        raise ValueError(f"{what} returned NaN or +inf; log scores must be finite or -inf")
    if bad_ref:
        raise ancestry.error(log_w, state.t - 1)
    if not any_need:
        return None, all_done
    index = torch.arange(R, device=state.device)
    # a prompt's running rows first, in order: its pool is the first |A| columns
    order = torch.sort(finished.view(B, N).long(), dim=1, stable=True).indices
    sizes = torch.where(need, n_run, 0)  # |A| of each prompt to resample, else 0
    for n in sizes.unique().tolist():  # prompts with the same |A| go in one batch
        if n == 0:
            continue
        bs = (sizes == n).nonzero()  # [G, 1]
        slots = order[bs[:, 0], :n]  # [G, n] their running rows
        lw = log_w[bs, slots]  # [G, n]
        anc = ancestry.ancestors(lw, running_bn[bs[:, 0], 0], gen)  # [G, n] pool positions
        index[bs * N + slots] = bs * N + slots.gather(1, anc)
        log_w[bs, slots] = lw.logsumexp(dim=1, keepdim=True) - math.log(n)
    state.reorder(index)
    return index, all_done


def finalize(
    state: RunState, cfg: SMCConfig, method: str, forward_tokens: int, scored: bool
) -> SamplingOutput:
    """The run's :class:`SamplingOutput` (``scored``: a potential took part, so each row's
    log phi is reported); warns for every prompt whose particles were all rejected."""
    B, N = state.B, state.N
    log_w = state.log_w
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
            stacklevel=4,
        )
    prompts, tokens = state.prompts, state.tokens
    seq = torch.cat([prompts.input_ids.repeat_interleave(N, dim=0), tokens], dim=1)
    texts = state.view(False).texts() if state.tokenizer is not None else [""] * state.R
    uniform = torch.full((B, N), -math.log(N), dtype=torch.float64)
    zeros = torch.zeros(B, N, dtype=torch.float64)
    return SamplingOutput(
        method=method,
        sequences=seq.view(B, N, -1).cpu(),
        prompt_length=prompts.input_ids.shape[1],
        texts=[texts[b * N : (b + 1) * N] for b in range(B)],
        log_weights=log_normalize(log_w).cpu() if cfg.reweight else uniform,
        log_weights_unnormalized=log_w.cpu() if cfg.reweight else zeros,
        log_z=log_z.cpu() if cfg.reweight else None,
        ess=torch.stack(state.ess_trace, dim=1).cpu(),
        resampled=torch.stack(state.resampled_trace, dim=1).cpu(),
        log_potential=state.log_phi.view(B, N).cpu() if scored else None,
        num_forward_tokens=int(forward_tokens),
    )
