"""SMC in blocks of K tokens, over a backend that samples the tokens itself (vLLM).

The same target, potentials, twists, resampling and output as :mod:`llmsample.smc.engine`;
only the proposal step differs. There the engine holds each row's next-token distribution
and draws from it; here a serving engine draws K tokens per row in one call and returns
each token's log p (the model) and log q (the distribution it was drawn from). For B
prompts with N particles each and K = ``cfg.resample_every``:

1. **Propose.** Every running row is one request: its prompt plus its tokens so far, at
   most min(K, T - t) new tokens, ending early at EOS, with a seed drawn from the run's
   generator. The backend returns the tokens and their summed log p and log q.
2. **Score** the new prefixes at the block's end: the twist on running rows, log phi on
   rows that completed (:func:`llmsample.smc.steps.score`).
3. **Reweight:** log w += sum log p - sum log q + log psi_new - log psi_old over the block.
   The product of the per-token ratios telescopes exactly as in the token engine, so the
   weights are exact for any K (the twist only needs to be evaluated at the boundaries).
4. **Resample** (partial, among running rows) at every block end, as in the token
   engine; a resampled row continues from its parent's tokens (the backend's prefix
   cache serves the shared prefix).
5. **Finalize:** a :class:`~llmsample.output.SamplingOutput` with ``ess`` and
   ``resampled`` given per block.

The output is properly weighted for the same sigma(x | c) = p(x | c) phi(x, c) / Z(c)
as :func:`llmsample.smc.engine.run_smc`, and exp(log Z) is unbiased for Z(c).

    out = run_smc_blocks(backend, tokenizer, batch, potential, SMCConfig(resample_every=8))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from tqdm.auto import tqdm

from llmsample.hf.prompts import PromptBatch
from llmsample.output import SamplingOutput
from llmsample.potentials.base import Potential
from llmsample.smc.conditional import FreeAncestry
from llmsample.smc.config import SMCConfig
from llmsample.smc.state import RunState
from llmsample.smc.steps import finalize, resample, reweight, score
from llmsample.twists import NoTwist, Twist

__all__ = ["Block", "BlockBackend", "run_smc_blocks"]


@dataclass
class Block:
    """What a backend returns for one request: the new tokens (ending with EOS when the
    row ended), and log p and log q of those tokens, summed."""

    tokens: list[int]
    log_p: float
    log_q: float


class BlockBackend(Protocol):
    """A model that extends many token sequences by up to k tokens each, in one call."""

    vocab_size: int
    computed_tokens: int  # token positions the model actually computed (cache hits excluded)

    def extend(
        self, sequences: list[list[int]], max_tokens: int, seeds: list[int] | None
    ) -> list[Block]: ...


def _prompt_rows(prompts: PromptBatch) -> list[list[int]]:
    """Each prompt's real token ids (left padding removed)."""
    mask = prompts.attention_mask.bool().cpu()
    return [row[m].tolist() for row, m in zip(prompts.input_ids.cpu(), mask)]


def run_smc_blocks(
    backend: BlockBackend,
    tokenizer,
    prompts: PromptBatch,
    potential: Potential | None,
    cfg: SMCConfig,
    *,
    twist: Twist | None = None,
    eos_token_ids: list[int] | None = None,
    method: str = "smc",
) -> SamplingOutput:
    """Run block SMC for every prompt of ``prompts``; see the module docstring."""
    twist = twist or NoTwist()
    prompts = prompts.to("cpu")
    N, T, K = cfg.num_particles, cfg.max_new_tokens, cfg.resample_every
    eos = torch.as_tensor(eos_token_ids or [], dtype=torch.long)
    state = RunState.new(prompts, tokenizer, eos, N, T, backend.vocab_size)
    gen = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
    ancestry = FreeAncestry(cfg.resampling)
    twist.bind(potential)  # the run's potential, passed once
    twist.start(prompts, N)
    rows_of_prompt = _prompt_rows(prompts)
    eos_set = set(eos.tolist())
    computed_before = backend.computed_tokens
    f64 = dict(dtype=torch.float64)
    blocks = range(0, T, K)
    for _ in tqdm(blocks, desc=method, disable=not cfg.progress, leave=False):
        k = min(K, T - state.t)
        active = ~state.finished
        running = active.nonzero().flatten().tolist()
        seqs = [rows_of_prompt[r // N] + state.buf[r, : state.t].tolist() for r in running]
        seeds = None
        if gen is not None:
            seeds = torch.randint(0, 2**31 - 1, (len(running),), generator=gen).tolist()
        out = backend.extend(seqs, k, seeds)
        block = torch.full((state.R, k), prompts.pad_token_id, dtype=torch.long)
        counts = torch.zeros(state.R, dtype=torch.long)
        ended = torch.zeros(state.R, dtype=torch.bool)
        lp, lq = torch.zeros(state.R, **f64), torch.zeros(state.R, **f64)
        for r, b in zip(running, out):
            n = len(b.tokens)
            stopped = n > 0 and b.tokens[-1] in eos_set
            if not (n == k or (stopped and n <= k)):
                raise RuntimeError(
                    f"the backend returned {n} tokens for a request of {k} that did not end "
                    "at EOS; check the model's context length and stop settings"
                )
            block[r, :n] = torch.tensor(b.tokens, dtype=torch.long)
            counts[r], ended[r], lp[r], lq[r] = n, stopped, b.log_p, b.log_q
        done_now = active & (ended | (state.t + k >= T))
        state.append(block, counts, done_now)
        new_psi = score(state, twist, potential, active & ~done_now, done_now)
        reweight(state, lp, lq, new_psi, active, done_now, ancestry, cfg.reweight)
        _, all_done = resample(state, cfg, ancestry, gen, boundary=True)
        if all_done:
            break
    forward = backend.computed_tokens - computed_before
    return finalize(state, cfg, method, forward, potential is not None)
