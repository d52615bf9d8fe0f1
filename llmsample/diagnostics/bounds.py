"""Bidirectional bounds on log Z: SMC from below, conditional SMC from above.

For sigma(x | c) = p(x | c) phi(x, c) / Z(c) and S independent runs:

- **lower** (:func:`log_z_lower`): plain SMC. E[Z_hat] = Z, so E[log Z_hat] <= log Z
  (Jensen): the mean of log Z_hat over runs is a stochastic lower bound.
- **upper** (:func:`log_z_upper`): conditional SMC (``run_smc(..., reference=x*)``) with
  row 0 clamped to an exact posterior sample x* ~ sigma. The law of all its particles is
  Q * Z_hat / Z (Q: the law of plain SMC), so E[log Z_hat] >= log Z.

The gap E_csmc[log Z_hat] - E_smc[log Z_hat] = KL(Q || Q Z_hat/Z) + KL(Q Z_hat/Z || Q)
bounds KL(q || sigma) + KL(sigma || q), where q is the law of one particle drawn by
weight from a run. It shrinks as N grows: report it against N (:func:`log_z_bounds_sweep`).
Conditional runs always resample multinomially (see :mod:`llmsample.smc`), so
:func:`log_z_bounds` runs the lower bound with ``resampling="multinomial"`` too unless told
otherwise: both bounds are valid whatever the lower bound's scheme, but only a matched
pair bounds the KL of one sampler.

Exact posterior samples are rarely available. With a toy model, draw them from
``enumerate_target``. For infilling, :func:`joint_infill_samples` makes synthetic problems
that come with one: draw the middle x ~ p(x | c), then the suffix s ~ p(s | c, x), from the
model itself; x is then an exact draw from sigma(x | c, s) ∝ p(x | c) p(s | c, x), the
:class:`~llmsample.potentials.SuffixLikelihood` target.

    lo = log_z_lower(model, tok, prompts, potential, 16, seeds=range(8), max_new_tokens=T)
    up = log_z_upper(model, tok, prompts, potential, 16, seeds=range(8), references=refs,
                     max_new_tokens=T)                  # refs[s][b]: x* for prompt b, run s
    log_z_bounds(...).gap                               # per prompt, with .gap_se

All runs use the keywords of :func:`~llmsample.smc_generate` (``twist``, ``proposal``,
``max_new_tokens``, ``eos_token_id``, ...); ``log Z_hat`` tensors are [S runs, B prompts].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from llmsample.generate import ancestral_generate, eos_ids, smc_generate
from llmsample.hf.prompts import encode_prompts, line_end_ids
from llmsample.metrics.posterior import bound_gap
from llmsample.potentials.base import Potential

__all__ = [
    "LogZBounds",
    "JointInfill",
    "log_z_lower",
    "log_z_upper",
    "log_z_bounds",
    "log_z_bounds_sweep",
    "joint_infill_samples",
]

Reference = Sequence[int] | Tensor


def _run(
    model,
    tokenizer,
    prompts,
    potential: Potential | None,
    num_particles: int,
    seed: int | None,
    reference: Sequence[Reference] | None = None,
    **smc_kwargs,
) -> Tensor:
    """log Z_hat [B] of one (conditional) SMC run of ``smc_generate`` (``smc_kwargs``: its
    other keyword arguments, e.g. twist, proposal, max_new_tokens, config)."""
    out = smc_generate(
        model,
        tokenizer,
        prompts,
        potential=potential,
        num_particles=num_particles,
        seed=seed,
        reference=reference,
        **smc_kwargs,
    )
    return out.log_z.double()


def log_z_lower(
    model, tokenizer, prompts, potential, num_particles: int, seeds: Iterable[int], **smc_kwargs
) -> Tensor:
    """log Z_hat of plain SMC, one run per seed: [S, B]. Its mean over runs is a stochastic
    lower bound on log Z (and ``exp`` of each entry is unbiased for Z)."""
    rows = [
        _run(model, tokenizer, prompts, potential, num_particles, s, **smc_kwargs) for s in seeds
    ]
    if not rows:
        raise ValueError("seeds is empty; give at least one seed")
    return torch.stack(rows)


def log_z_upper(
    model,
    tokenizer,
    prompts,
    potential,
    num_particles: int,
    seeds: Iterable[int],
    references: Sequence[Sequence[Reference]],
    **smc_kwargs,
) -> Tensor:
    """log Z_hat of conditional SMC, one run per seed: [S, B]. ``references[s][b]`` is an
    exact posterior sample x* ~ sigma(. | prompt b) (token ids of a complete continuation:
    ending with an EOS id, or max_new_tokens ids), independent across runs. The mean over
    runs is then a stochastic upper bound on log Z. A reference not drawn from sigma gives
    no bound at all."""
    seeds = list(seeds)
    if len(references) != len(seeds):
        raise ValueError(
            f"references has {len(references)} entries for {len(seeds)} seeds; give one "
            "reference per prompt for every seed"
        )
    if not seeds:
        raise ValueError("seeds is empty; give at least one seed")
    rows = [
        _run(model, tokenizer, prompts, potential, num_particles, s, ref, **smc_kwargs)
        for s, ref in zip(seeds, references)
    ]
    return torch.stack(rows)


@dataclasses.dataclass
class LogZBounds:
    """Lower and upper bounds on log Z per prompt, from S runs each (see the module).

    ``lower``/``upper``: means of log Z_hat over runs, [B]; ``*_se``: their standard errors
    (inf with one run); ``gap = upper - lower`` with ``gap_se`` (the two sets of runs
    taken as independent). ``lower_runs``/``upper_runs``: the raw [S, B] estimates.
    """

    num_particles: int
    lower_runs: Tensor
    upper_runs: Tensor
    lower: Tensor
    lower_se: Tensor
    upper: Tensor
    upper_se: Tensor
    gap: Tensor
    gap_se: Tensor

    @classmethod
    def from_runs(cls, num_particles: int, lower_runs: Tensor, upper_runs: Tensor) -> LogZBounds:
        per = bound_gap(lower_runs, upper_runs)["per_prompt"]
        t = {k: torch.tensor(v, dtype=torch.float64) for k, v in per.items()}
        return cls(num_particles, lower_runs, upper_runs, **t)

    def summary(self) -> dict:
        """:func:`llmsample.metrics.bound_gap` of the runs, plus ``num_particles``."""
        return bound_gap(self.lower_runs, self.upper_runs) | {"num_particles": self.num_particles}


def log_z_bounds(
    model, tokenizer, prompts, potential, num_particles: int, seeds, references, **smc_kwargs
) -> LogZBounds:
    """Both bounds with the same settings: S = len(seeds) plain SMC runs and S conditional
    SMC runs (``references[s][b]``; the arguments are :func:`log_z_upper`'s). Resampling
    defaults to multinomial here (unless ``resampling=`` or ``config=`` says otherwise),
    the scheme of the conditional runs, so that the gap bounds the KL of one sampler."""
    seeds = list(seeds)
    if "config" not in smc_kwargs:
        smc_kwargs.setdefault("resampling", "multinomial")
    lower = log_z_lower(model, tokenizer, prompts, potential, num_particles, seeds, **smc_kwargs)
    upper = log_z_upper(
        model, tokenizer, prompts, potential, num_particles, seeds, references, **smc_kwargs
    )
    return LogZBounds.from_runs(num_particles, lower, upper)


def log_z_bounds_sweep(
    model,
    tokenizer,
    prompts,
    potential,
    particle_counts: Iterable[int],
    seeds: Iterable[int],
    references: Sequence[Sequence[Reference]],
    **smc_kwargs,
) -> dict[int, LogZBounds]:
    """:func:`log_z_bounds` for each N in ``particle_counts``: the gap as N grows."""
    seeds = list(seeds)
    return {
        n: log_z_bounds(model, tokenizer, prompts, potential, n, seeds, references, **smc_kwargs)
        for n in particle_counts
    }


class JointInfill(NamedTuple):
    """Synthetic infilling problems with an exact posterior sample each."""

    prompts: list[str]  # the contexts c, as given
    suffixes: list[str]  # s ~ p(s | c, x), decoded (re-encodes to the sampled ids)
    references: list[tuple[int, ...]]  # x ~ sigma(x | c, s): complete continuations


def _complete(row: list[int], eos: set[int], T: int) -> tuple[int, ...]:
    """The continuation in ``row`` up to and including its first EOS (T tokens if none)."""
    for i, v in enumerate(row):
        if v in eos:
            return tuple(row[: i + 1])
    return tuple(row[:T])


def joint_infill_samples(
    model,
    tokenizer,
    prompts: str | list[str],
    max_new_tokens: int,
    suffix_tokens: int,
    seed: int | None = None,
    *,
    eos_token_id: int | list[int] | None = None,
    max_tries: int = 10,
) -> JointInfill:
    """One synthetic infilling problem per prompt c, with an exact posterior sample.

    Draws the middle x ~ p(x | c) by ancestral sampling until an EOS id (default: the line
    ends, ``line_end_ids(tokenizer)``) or ``max_new_tokens`` tokens, then ``suffix_tokens``
    tokens s ~ p(s | c, x) from the model, conditioned on x's tokens without its final EOS
    (as :class:`~llmsample.potentials.SuffixLikelihood` scores the suffix). The pair is a
    draw from the model's joint, so x is an exact sample from the target of
    ``SuffixLikelihood(model, tokenizer, suffixes)`` with the same ``max_new_tokens`` and
    EOS ids: pass ``[references]`` to :func:`log_z_upper` (one run per problem; repeat the
    prompts for more problems).

    ``SuffixLikelihood`` re-encodes the suffix text, so a pair whose decoded suffix does not
    re-encode to the sampled ids is redrawn whole (x and s), up to ``max_tries`` times;
    this conditions on an event of s alone and keeps x | s exact.

    Caveats: the guarantee is for these synthetic problems, whose suffixes come from the
    model (the average over problems bounds E_s[log Z(c, s)]). The true middle line of a
    real document is an exact posterior sample only if the data came from the model; with
    real data, conditional SMC seeded with it gives no guaranteed bound.
    """
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not isinstance(suffix_tokens, int) or suffix_tokens < 1:
        raise ValueError(f"suffix_tokens must be an integer >= 1, got {suffix_tokens!r}")
    eos = line_end_ids(tokenizer) if eos_token_id is None else eos_ids(None, None, eos_token_id)
    eos_set = set(eos)
    prompt_ids = encode_prompts(tokenizer, texts)
    rows = [r[m.bool()].tolist() for r, m in zip(prompt_ids.input_ids, prompt_ids.attention_mask)]
    suffixes: list[str | None] = [None] * len(texts)
    references: list[tuple[int, ...] | None] = [None] * len(texts)
    pending = list(range(len(texts)))
    for attempt in range(max_tries):
        s0 = None if seed is None else seed + 2 * attempt
        mid = ancestral_generate(
            model,
            tokenizer,
            [texts[i] for i in pending],
            num_samples=1,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            seed=s0,
        )
        xs = [_complete(r.tolist(), eos_set, max_new_tokens) for r in mid.continuations[:, 0]]
        contexts = [rows[i] + [v for v in x if v not in eos_set] for i, x in zip(pending, xs)]
        width = max(map(len, contexts))
        ids = torch.full((len(contexts), width), prompt_ids.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, c in enumerate(contexts):
            ids[r, : len(c)], mask[r, : len(c)] = torch.tensor(c), 1
        suf = ancestral_generate(
            model,
            tokenizer,
            input_ids=ids,
            attention_mask=mask,
            num_samples=1,
            max_new_tokens=suffix_tokens,
            eos_token_id=[],  # exactly suffix_tokens tokens, as SuffixLikelihood scores them
            pad_token_id=prompt_ids.pad_token_id,
            seed=None if s0 is None else s0 + 1,
        )
        still = []
        for i, x, s in zip(pending, xs, suf.continuations[:, 0].tolist()):
            text = tokenizer.decode(s)
            if tokenizer(text, add_special_tokens=False)["input_ids"] == s:
                suffixes[i], references[i] = text, x
            else:
                still.append(i)
        pending = still
        if not pending:
            return JointInfill(texts, suffixes, references)
    raise ValueError(
        f"prompt(s) {pending}: no sampled suffix re-encoded to its own token ids in "
        f"{max_tries} tries; raise max_tries or use fewer suffix_tokens"
    )
