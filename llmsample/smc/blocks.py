"""SMC in blocks of K tokens, over a backend that samples the tokens itself (vLLM).

The same target, potentials, twists, resampling and output as :mod:`llmsample.smc.engine`;
only the proposal step differs. There the engine holds each row's next-token distribution
and draws from it; here a serving engine draws K tokens per row in one call and returns
each token's log p (the model) and log q (the distribution it was drawn from). For B
prompts with N particles each and K = ``cfg.resample_every``, every prompt has its block
ends fixed in advance (:func:`block_ends`), and each round of the loop:

1. **Propose.** Every running row is one request: its prompt plus its tokens so far, up
   to its prompt's next block end (or T) in new tokens, ending early at EOS, with a seed
   drawn from the run's generator. The backend returns the tokens and their summed log p
   and log q.
2. **Score** the new prefixes at the block's end: the twist on running rows, log phi on
   rows that completed (:func:`llmsample.smc.steps.score`).
3. **Reweight:** log w += sum log p - sum log q + log psi_new - log psi_old over the block.
   The product of the per-token ratios telescopes exactly as in the token engine, so the
   weights are exact for any block ends (the twist only needs to be evaluated there).
4. **Resample** (partial, among running rows) at every block end, as in the token
   engine; a resampled row continues from its parent's tokens (the backend's prefix
   cache serves the shared prefix).
5. **Finalize:** a :class:`~llmsample.output.SamplingOutput` with ``ess`` and
   ``resampled`` given per round.

**Aligned blocks.** A backend with a prefix cache in KV blocks of ``kv_block_size`` tokens
(vLLM) serves a request's cached prefix in whole blocks and only while one token is left
to compute, so a request of L tokens recomputes ((L - 1) mod kv_block_size) + 1 of them.
With ``cfg.align_blocks`` each prompt's first block holds K/2 to 3K/2 tokens so that its
block ends fall where prompt length + t = 1 (mod kv_block_size): every end when K is a
multiple of the KV block size, every (lcm / K)-th otherwise. Blocks hold K tokens after
the first; prompts of different lengths then sit at different t, which the state allows
(each row has its own length).

The output is properly weighted for the same sigma(x | c) = p(x | c) phi(x, c) / Z(c)
as :func:`llmsample.smc.engine.run_smc`, and exp(log Z) is unbiased for Z(c).

    out = run_smc_blocks(backend, tokenizer, batch, potential, SMCConfig(resample_every=8))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from llmsample.hf.prompts import PromptBatch
from llmsample.output import SamplingOutput
from llmsample.potentials.base import Potential
from llmsample.smc.conditional import FreeAncestry
from llmsample.smc.config import SMCConfig
from llmsample.smc.state import RunState
from llmsample.smc.steps import finalize, resample, reweight, score
from llmsample.twists import NoTwist, Twist, effective_twist

__all__ = ["Block", "BlockBackend", "block_ends", "run_smc_blocks"]


@dataclass
class Block:
    """What a backend returns for one request: the new tokens (ending with EOS when the
    row ended), and log p and log q of those tokens, summed."""

    tokens: list[int]
    log_p: float
    log_q: float


class BlockBackend(Protocol):
    """A model that extends many token sequences, each by up to its own number of tokens,
    in one call."""

    vocab_size: int
    computed_tokens: int  # token positions the model actually computed (cache hits excluded)
    kv_block_size: int | None  # its prefix cache's KV block, or None (no prefix cache)

    def extend(
        self, sequences: list[list[int]], max_tokens: list[int], seeds: list[int] | None
    ) -> list[Block]: ...


def block_ends(prompt_len: int, T: int, K: int, kv_block: int | None = None) -> list[int]:
    """The token counts t at which a prompt of ``prompt_len`` tokens ends its blocks: every
    K tokens and at T. With a ``kv_block`` size, the first block holds K/2 to 3K/2 tokens
    instead of K, so that an end falls at prompt_len + t = 1 (mod kv_block), where a
    particle's whole prefix but one token comes from the cache; later ends follow every K
    tokens (all aligned when K is a multiple of kv_block)."""
    first = K
    if kv_block is not None:
        h = (K + 1) // 2  # a first block shorter than K/2 would add a round for little
        aligned = h + (1 - prompt_len - h) % kv_block  # the first such t >= h
        first = h + (aligned - h) % K  # in [h, h + K), a whole number of blocks before it
    return [*range(first, T, K), T]


def _prompt_rows(prompts: PromptBatch) -> list[list[int]]:
    """Each prompt's real token ids (left padding removed)."""
    mask = prompts.attention_mask.bool().cpu()
    return [row[m].tolist() for row, m in zip(prompts.input_ids.cpu(), mask)]


def _collect(state: RunState, running: list[int], out: list[Block], want: Tensor, eos_set):
    """The backend's blocks as [R, k] tokens (pad after each row's own), counts, whether
    each row ended at EOS, and summed log p / log q; checks each block's length."""
    k = max([len(b.tokens) for b in out], default=0)
    block = torch.full((state.R, k), state.prompts.pad_token_id, dtype=torch.long)
    counts = torch.zeros(state.R, dtype=torch.long)
    ended = torch.zeros(state.R, dtype=torch.bool)
    lp, lq = torch.zeros(state.R, dtype=torch.float64), torch.zeros(state.R, dtype=torch.float64)
    for r, b in zip(running, out):
        n, asked = len(b.tokens), int(want[r])
        stopped = n > 0 and b.tokens[-1] in eos_set
        if not (n == asked or (stopped and n <= asked)):
            raise RuntimeError(
                f"the backend returned {n} tokens for a request of {asked} that did not end "
                "at EOS; check the model's context length and stop settings"
            )
        block[r, :n] = torch.tensor(b.tokens, dtype=torch.long)
        counts[r], ended[r], lp[r], lq[r] = n, stopped, b.log_p, b.log_q
    return block, counts, ended, lp, lq


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
    twist = effective_twist(
        twist or NoTwist(), resamples=cfg.ess_threshold > 0, proposal_reads_scores=False
    )
    prompts = prompts.to("cpu")
    N, T, K = cfg.num_particles, cfg.max_new_tokens, cfg.resample_every
    eos = torch.as_tensor(eos_token_ids or [], dtype=torch.long)
    state = RunState.new(prompts, tokenizer, eos, N, T, backend.vocab_size)
    gen = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
    ancestry = FreeAncestry(cfg.resampling)
    twist.bind(potential)  # the run's potential, passed once
    twist.start(prompts, N)
    rows_of_prompt = _prompt_rows(prompts)
    kv_block = backend.kv_block_size if cfg.align_blocks else None
    ends = [block_ends(len(p), T, K, kv_block) for p in rows_of_prompt]
    rounds = max(map(len, ends))
    end_at = torch.tensor([e + [T] * (rounds - len(e)) for e in ends])  # [B, rounds]
    eos_set = set(eos.tolist())
    computed_before = backend.computed_tokens
    for j in tqdm(range(rounds), desc=method, disable=not cfg.progress, leave=False):
        active = ~state.finished
        want = end_at[:, j].repeat_interleave(N) - state.lengths  # [R] new tokens per row
        running = active.nonzero().flatten().tolist()
        lens = state.lengths.tolist()
        seqs = [rows_of_prompt[r // N] + state.buf[r, : lens[r]].tolist() for r in running]
        seeds = None
        if gen is not None:
            seeds = torch.randint(0, 2**31 - 1, (len(running),), generator=gen).tolist()
        out = backend.extend(seqs, want[running].tolist(), seeds)
        block, counts, ended, lp, lq = _collect(state, running, out, want, eos_set)
        done_now = active & (ended | (state.lengths + counts >= T))
        state.append_ragged(block, counts, done_now)
        new_psi = score(state, twist, potential, active & ~done_now, done_now)
        reweight(state, lp, lq, new_psi, active, done_now, ancestry, cfg.reweight)
        _, all_done = resample(state, cfg, ancestry, gen, boundary=True)
        if all_done:
            break
    forward = backend.computed_tokens - computed_before
    return finalize(state, cfg, method, forward, potential is not None)
