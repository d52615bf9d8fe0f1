"""A Hugging Face model as a block backend: the reference for block SMC's other backends.

:func:`llmsample.smc.blocks.run_smc_blocks` asks a backend to extend many sequences by up
to k tokens each and to return the tokens with their log p and log q. vLLM does that in a
serving engine (:mod:`llmsample.vllm`); :class:`HFBlocks` does it with one KV session per
call on any causal LM, drawing from the same tempered/truncated distributions as
:class:`~llmsample.proposals.LMProposal`. It recomputes each request's prefix (no prefix
cache): it is the exact, backend-free reference the tests compare vLLM with, and lets
block SMC run where vLLM does not. ``kv_block_size`` gives it vLLM's block ends (aligned to
that KV block size, :func:`llmsample.smc.blocks.block_ends`) for a like-for-like run.

    backend = HFBlocks(model, pad_token_id=tok.pad_token_id, eos_token_ids=[tok.eos_token_id])
    out = run_smc_blocks(backend, tok, batch, potential, SMCConfig(resample_every=4))
"""

from __future__ import annotations

import torch

from llmsample.hf.prompts import PromptBatch
from llmsample.hf.session import LMSession, vocab_size
from llmsample.proposals import truncate
from llmsample.smc.blocks import Block

__all__ = ["HFBlocks"]


class HFBlocks:
    """Extends sequences with ``model``, drawing each token from the base distribution
    tempered by ``temperature`` and truncated by ``top_k``/``top_p`` (exact log q)."""

    def __init__(
        self,
        model,
        *,
        pad_token_id: int,
        eos_token_ids: list[int],
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        kv_block_size: int | None = None,
    ):
        self.model = model
        self.vocab_size = vocab_size(model)
        self.pad_token_id, self.eos = pad_token_id, list(eos_token_ids)
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.computed_tokens = 0
        self.kv_block_size = kv_block_size

    def extend(
        self, sequences: list[list[int]], max_tokens: list[int], seeds: list[int] | None
    ) -> list[Block]:
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(sequences):
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
        session = LMSession(self.model, PromptBatch(ids, mask, self.pad_token_id), 1)
        gen = torch.Generator(device=session.device)
        gen.manual_seed(seeds[0]) if seeds else gen.seed()
        eos = torch.tensor(self.eos, dtype=torch.long, device=session.device)
        R, k = len(sequences), max(max_tokens)
        room = torch.tensor(max_tokens, device=session.device)  # [R] tokens each row may take
        out = torch.full((R, k), self.pad_token_id, dtype=torch.long)
        lp = torch.zeros(R, dtype=torch.float64)
        lq = torch.zeros(R, dtype=torch.float64)
        running = torch.ones(R, dtype=torch.bool, device=session.device)
        counts = torch.zeros(R, dtype=torch.long)
        for i in range(k):
            logp = session.logp  # [R, V]
            logq = truncate(logp, self.temperature, self.top_k, self.top_p)
            new = torch.multinomial(logq.exp(), 1, generator=gen)[:, 0]  # [R]
            on = running.cpu()
            lp += torch.where(on, logp.gather(1, new[:, None])[:, 0].double().cpu(), 0.0)
            lq += torch.where(on, logq.gather(1, new[:, None])[:, 0].double().cpu(), 0.0)
            out[:, i] = torch.where(on, new.cpu(), self.pad_token_id)
            counts += on.long()
            running = running & ~torch.isin(new, eos) & (room > i + 1)
            if i + 1 == k or not running.any():
                break
            session.step(new)
        self.computed_tokens += session.forward_tokens
        return [Block(out[i, : counts[i]].tolist(), float(lp[i]), float(lq[i])) for i in range(R)]
