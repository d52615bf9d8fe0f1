"""The vLLM boundary: a ``vllm.LLM`` engine as a block backend for SMC.

The only code that touches vLLM (imported lazily: vLLM is an optional install, see the
README). ``smc_generate(llm, ...)`` with a ``vllm.LLM`` runs
:func:`llmsample.smc.blocks.run_smc_blocks` on :class:`VLLMBlocks`:

    from vllm import LLM
    llm = LLM("HuggingFaceTB/SmolLM2-135M-Instruct", enable_prefix_caching=True, block_size=32)
    out = llmsample.smc_generate(llm, None, ["..."], chat=True, potential=...,
                                 config=llmsample.SMCConfig(num_particles=16, resample_every=16))

Each block is one ``llm.generate`` call with one request per running particle: its
prompt and tokens so far as a ``TokensPrompt``, ``max_tokens`` = the block, a seed from
the run's generator, and ``stop_token_ids`` = the run's EOS ids (``ignore_eos`` so that
vLLM stops at those ids and no others). A resampled particle is a new request whose
prompt is its parent's prefix; with ``enable_prefix_caching=True`` vLLM serves that prefix
from its cache in whole KV blocks, so only the tail of the last block and the new tokens
are computed (``computed_tokens`` counts them, from each request's ``num_cached_tokens``).
Small blocks share more: on CPU the default is 128 tokens, the smallest ``block_size=32``.
vLLM serves cached blocks only while at least one prompt token is left to compute, so a
request of L tokens recomputes ((L - 1) mod ``block_size``) + 1 of them. Block SMC
therefore places each prompt's block ends where prompt length + t = 1 (mod
``block_size``) (``SMCConfig.align_blocks``, on by default; the first block holds K/2 to
3K/2 tokens): every end when ``resample_every`` is a multiple of ``block_size``. SmolLM2,
44-token prompt: benchmarks/RESULTS.md has the aligned and unaligned runs side by side.

**Exact weights, from vLLM's public API.** The engine must run with
``logprobs_mode="raw_logprobs"`` (vLLM's default), so a token's logprob is the model's own
log p, whatever the sampling settings.

- Base proposal (temperature 1, no top-k/top-p): q = p, so log p - log q = 0; each token's
  log p comes back with it (``logprobs=0``).
- Tempered and/or top-k/top-p proposals: each step returns the full raw log p vector
  (``logprobs=-1`` with ``flat_logprobs``, which needs ``LLM(..., max_logprobs=-1)``), and
  log q of the drawn token is :func:`llmsample.proposals.truncate` of it: the same
  function, and the same tempering-then-top-k-then-top-p rule, as vLLM's sampler and the
  HF engine. A drawn token outside that support (a rounding tie at the top-p edge) raises
  rather than returning a biased weight.

Not on vLLM (clear errors from :func:`check_supported`): the locally optimal proposal,
model/adapter proposals, logits hooks, learned (stateful) twists, ``stop_guard`` and
conditional SMC (``reference=``). Use the HF engine for those.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from llmsample.proposals import LMProposal, truncate
from llmsample.smc.blocks import Block, run_smc_blocks
from llmsample.twists import NoTwist, PotentialTwist

__all__ = [
    "is_vllm_engine",
    "VLLMBlocks",
    "EngineModel",
    "check_supported",
    "run_smc_vllm",
    "shutdown",
]


def is_vllm_engine(model) -> bool:
    """True for a ``vllm.LLM`` (checked without importing vLLM)."""
    return type(model).__module__.split(".")[0] == "vllm" and hasattr(model, "llm_engine")


def shutdown(llm) -> None:
    """Stop a ``vllm.LLM``'s engine processes now. vLLM 0.32 has no public close; its
    engine client does, and a process that leaves it running cannot exit (its
    ``multiprocessing`` children are joined at exit). Safe to call twice."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()


class EngineModel:
    """The attributes of an HF model that prompt encoding and EOS lookup read, for a
    ``vllm.LLM``: ``config.vocab_size``, ``config.max_position_embeddings`` (the engine's
    ``max_model_len``) and ``generation_config.eos_token_id``."""

    def __init__(self, llm):
        cfg = llm.llm_engine.model_config
        self.config = SimpleNamespace(
            vocab_size=cfg.get_vocab_size(), max_position_embeddings=cfg.max_model_len
        )
        eos = cfg.try_get_generation_config().get("eos_token_id")
        self.generation_config = SimpleNamespace(eos_token_id=eos)
        self.logprobs_mode = str(getattr(cfg, "logprobs_mode", "raw_logprobs"))
        self.max_logprobs = cfg.max_logprobs


def check_supported(proposal, twist, cfg, reference) -> None:
    """Refuse what the vLLM backend cannot run exactly (module docstring)."""
    if type(proposal) is not LMProposal or proposal.logits_hook is not None:
        raise ValueError(
            f"proposal {proposal!r} is not available on vLLM: only the base model, tempered "
            "or top-k/top-p truncated (LMProposal without a logits_hook), runs there. Use "
            "a Hugging Face model for the locally optimal, adapter or model proposals"
        )
    if type(twist) not in (NoTwist, PotentialTwist):
        raise ValueError(
            f"twist {type(twist).__name__} is not available on vLLM: only 'none' and "
            "'prefix' (the potential's own prefix scores) run there; learned twists keep "
            "per-particle model state and need a Hugging Face model"
        )
    if cfg.stop_guard:
        raise ValueError("stop_guard is not available on vLLM; use a Hugging Face model")
    if reference is not None:
        raise ValueError(
            "conditional SMC (reference=) is not available on vLLM; use a Hugging Face model"
        )


class VLLMBlocks:
    """A ``vllm.LLM`` as a :class:`~llmsample.smc.blocks.BlockBackend` (module docstring)."""

    def __init__(self, llm, proposal: LMProposal, eos_token_ids: list[int]):
        info = EngineModel(llm)
        if info.logprobs_mode != "raw_logprobs":
            raise ValueError(
                f"the vLLM engine runs with logprobs_mode={info.logprobs_mode!r}; SMC needs "
                "the model's own log-probabilities: start it with "
                "LLM(..., logprobs_mode='raw_logprobs') (vLLM's default)"
            )
        q = proposal
        self.base = q.temperature == 1.0 and q.top_k is None and q.top_p in (None, 1.0)
        if not self.base and info.max_logprobs != -1:
            raise ValueError(
                f"{q!r} on vLLM needs each step's full log-probability vector to weigh "
                "tokens exactly; start the engine with LLM(..., max_logprobs=-1)"
            )
        self.llm, self.proposal = llm, q
        self.vocab_size = info.config.vocab_size
        self.eos = list(eos_token_ids)
        self.computed_tokens = 0
        cache = llm.llm_engine.vllm_config.cache_config
        unit = cache.prefix_match_unit or cache.block_size  # where a cache hit can end
        self.kv_block_size = unit if cache.enable_prefix_caching else None

    def _params(self, max_tokens: int, seed: int | None):
        from vllm import SamplingParams

        q = self.proposal
        return SamplingParams(
            n=1,
            max_tokens=max_tokens,
            temperature=q.temperature,
            top_k=q.top_k or 0,
            top_p=1.0 if q.top_p is None else q.top_p,
            min_p=0.0,
            repetition_penalty=1.0,
            presence_penalty=0.0,
            frequency_penalty=0.0,
            seed=seed,
            stop_token_ids=self.eos,
            ignore_eos=True,  # stop at the run's EOS ids, and only at those
            logprobs=0 if self.base else -1,
            flat_logprobs=not self.base,
            detokenize=False,
        )

    def extend(
        self, sequences: list[list[int]], max_tokens: list[int], seeds: list[int] | None
    ) -> list[Block]:
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=s) for s in sequences]
        seeds = seeds if seeds is not None else [None] * len(sequences)
        params = [self._params(k, s) for k, s in zip(max_tokens, seeds)]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        blocks = []
        for seq, out in zip(sequences, outs):
            c = out.outputs[0]
            tokens = list(c.token_ids)
            self.computed_tokens += len(seq) - (out.num_cached_tokens or 0) + len(tokens)
            blocks.append(self._weigh(tokens, c.logprobs))
        return blocks

    def _weigh(self, tokens: list[int], logprobs) -> Block:
        if self.base:  # q = p: each entry holds the drawn token's raw log p
            lp = math.fsum(pos[x].logprob for pos, x in zip(logprobs, tokens))
            return Block(tokens, lp, lp)
        V, q = self.vocab_size, self.proposal
        full = torch.full((len(tokens), V), -math.inf, dtype=torch.float64)  # [k, V]
        for i in range(len(tokens)):
            a, b = logprobs.start_indices[i], logprobs.end_indices[i]
            ids = torch.tensor(logprobs.token_ids[a:b], dtype=torch.long)
            full[i, ids] = torch.tensor(logprobs.logprobs[a:b], dtype=torch.float64)
        x = torch.tensor(tokens, dtype=torch.long)[:, None]
        lp = full.gather(1, x)[:, 0]
        lq = truncate(full, q.temperature, q.top_k, q.top_p).gather(1, x)[:, 0]
        if not torch.isfinite(lq).all():
            raise RuntimeError(
                f"vLLM drew a token that {q!r} gives probability 0 (a tie or rounding at the "
                "top-k/top-p edge); its weight would be wrong. Rerun with another seed, or "
                "use temperature only"
            )
        return Block(tokens, float(lp.sum()), float(lq.sum()))


def run_smc_vllm(engine, tokenizer, batch, potential, cfg, proposal, twist, eos, method, reference):
    """``smc_generate`` on a ``vllm.LLM``: block SMC (blocks of ``cfg.resample_every``
    tokens, :mod:`llmsample.smc.blocks`) on :class:`VLLMBlocks`."""
    check_supported(proposal, twist, cfg, reference)
    P, T = batch.input_ids.shape[1], cfg.max_new_tokens
    limit = EngineModel(engine).config.max_position_embeddings
    if P + T > limit:
        raise ValueError(
            f"prompt length {P} + max_new_tokens {T} = {P + T} exceeds the vLLM engine's "
            f"max_model_len of {limit}; shorten the prompt, lower max_new_tokens, or start "
            "the engine with a larger max_model_len"
        )
    backend = VLLMBlocks(engine, proposal, eos)
    return run_smc_blocks(
        backend, tokenizer, batch, potential, cfg, twist=twist, eos_token_ids=eos, method=method
    )
