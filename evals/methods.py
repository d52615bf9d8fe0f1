"""The samplers compared by the evals, as (method, knob) cells.

Every method returns a :class:`llmsample.SamplingOutput`; :func:`draws` turns it into
``k`` samples per prompt: posterior draws by weight for weighted methods (SMC,
importance sampling), the samples themselves for plain ones (ancestral, beam), or the
draws a method chose itself (``out.extras["draw_index"]``: best-of-N, smc-indep).
Continuations end at the end of their line (``line_end_ids``), except for chat tasks
(``task.chat``, commongen): those send the prompt through the chat template and end at
the model's EOS (``<|im_end|>``).

**commongen grid** (:func:`_commongen_grid`): every method spends ``N_COMMONGEN = 16``
sequences per prompt (samples, beams or particles), so forward tokens are about equal
(best-of-N adds a teacher-forced rerank of its distinct candidates); all are scored on
the same ``k`` draws per prompt (``--samples``, 4 by default):

- ``ancestral`` T=1.0 / T=0.7: 16 samples, the first k scored (they are exchangeable).
- ``beam`` B=16: the 16 beams (best first), the top k scored.
- ``best-of-n``: importance sampling with N=16 (q = p, so the weights are phi), the
  particles ranked by log phi, then by the base model's log p(x | prompt) (teacher
  forced); the draws are the top k distinct texts (repeated from the top when fewer
  than k are distinct). Draw 1 is the best-of-N output.
- ``importance`` N=16, ``smc`` N=16 (no twist), ``smc-twist`` N=16 (prefix twist: a
  bonus of 2 nats per concept already covered): k posterior draws by weight.
- ``smc-indep`` N=16,K=k: K independent SMC runs of N/K particles (the prompts repeated
  K times in one batch; rows of a batch never interact), one draw by weight from each
  run. Each draw is an approximate posterior sample on its own, and they are
  independent, unlike k draws from one run's particles, which collapse to few texts.
  Its log Z is log mean_r Z_r (unbiased for Z, like each run's).
- ``smc-twist-indep`` N=16,K=k: the same with the prefix twist in every run.
- ``smc-guard`` N=16 and ``smc-guard-indep`` N=16,K=k: ``smc-twist`` and
  ``smc-twist-indep`` with ``stop_guard=True`` (no EOS while a concept is missing; exact).
- ``smc-guard`` N=64: the same at 4x the compute (the one row that is not at equal
  forward tokens).
- with ``evals/artifacts/adapters/commongen/adapter_config.json``: ``gfn`` (16 samples of the
  GFlowNet policy) and ``smc-gfn`` (SMC with the policy as the proposal and the prefix
  twist; weights against p_base * phi).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

import llmsample
from evals.paths import ADAPTERS, TWISTS
from llmsample.hf.prompts import encode_prompts, line_end_ids
from llmsample.hf.session import teacher_force
from llmsample.output import SamplingOutput
from llmsample.proposals import LMProposal

__all__ = ["Method", "methods", "draws", "score_texts", "ADAPTERS", "TWISTS", "N_COMMONGEN"]

# sequences per prompt (samples, beams, particles) for every commongen method
N_COMMONGEN = 16

# ADAPTERS: GFlowNet LoRA policies (recipes/configs/gfn_<task>.yaml), one per task;
# TWISTS: CTL twist heads (recipes/configs/twist_ctl_<task>.yaml); see evals.paths


@dataclass(frozen=True)
class Method:
    name: str
    knob: str
    run: Callable  # (model, tokenizer, task, examples, seed) -> SamplingOutput

    @property
    def key(self) -> str:
        return f"{self.name}[{self.knob}]"


def _common(model, tok, task, examples, seed):
    if task.chat:  # EOS from the model's generation config / tokenizer (<|im_end|>)
        return dict(max_new_tokens=task.max_new_tokens, eos_token_id=None, seed=seed, chat=True)
    return dict(
        max_new_tokens=task.max_new_tokens,
        eos_token_id=line_end_ids(tok),
        seed=seed,
    )


def _ancestral(temperature=1.0, top_p=None, k=8):
    def run(model, tok, task, examples, seed):
        return llmsample.ancestral_generate(
            model,
            tok,
            [e.prompt for e in examples],
            num_samples=k,
            temperature=temperature,
            top_p=top_p,
            potential=task.potential(model, tok, examples),
            **_common(model, tok, task, examples, seed),
        )

    return run


def _beam(k=8):
    def run(model, tok, task, examples, seed):
        c = _common(model, tok, task, examples, seed)
        return llmsample.beam_generate(
            model,
            tok,
            [e.prompt for e in examples],
            num_beams=k,
            potential=task.potential(model, tok, examples),
            max_new_tokens=c["max_new_tokens"],
            eos_token_id=c["eos_token_id"],
            chat=c.get("chat", False),
        )

    return run


def _smc(n, twist=False, resample=True, proposal=None, guard=False):
    def run(model, tok, task, examples, seed):
        fn = llmsample.smc_generate if resample else llmsample.importance_generate
        return fn(
            model,
            tok,
            [e.prompt for e in examples],
            potential=task.potential(model, tok, examples, twist=twist),
            num_particles=n,
            proposal=proposal or LMProposal(),
            stop_guard=guard,
            **_common(model, tok, task, examples, seed),
        )

    return run


@lru_cache(maxsize=2)
def _policy(model_name: str, adapter: str):
    """A GFlowNet policy: its own copy of the base model plus the adapter folder, so the
    base model that every other method (and every potential) uses stays clean."""
    policy, _ = llmsample.load_model(model_name, adapter=adapter)
    return policy


def _gfn(adapter: str, k=8):
    """Plain samples from the GFlowNet policy (unweighted, like ancestral sampling)."""

    def run(model, tok, task, examples, seed):
        return llmsample.ancestral_generate(
            _policy(model.name_or_path, adapter),
            tok,
            [e.prompt for e in examples],
            num_samples=k,
            potential=task.potential(model, tok, examples),
            **_common(model, tok, task, examples, seed),
        )

    return run


def _gfn_is(adapter: str, n):
    """The GFlowNet policy as the proposal, weights p_base phi / q (importance sampling).

    No resampling: without a twist, SMC's intermediate weights p(x_<=t) / q(x_<=t) would
    pull particles back towards the base model's prefix marginals, undoing the policy.
    (With the policy's own implied flow as the twist every intermediate weight is 1, and
    SMC reduces to exactly this.)
    """

    def run(model, tok, task, examples, seed):
        policy = _policy(model.name_or_path, adapter)
        return _smc(n, resample=False, proposal=policy)(model, tok, task, examples, seed)

    return run


@lru_cache(maxsize=2)
def _head(task_name: str):
    from llmsample.ctl.head import TwistHead

    return TwistHead.load(TWISTS / task_name / "twist_head.pt").eval()


def _smc_learned(n):
    """SMC with the task's learned (CTL) twist; a conditional head reads each prompt's
    suffix (line-infill) through ``text_features``."""
    from llmsample.ctl.head import LearnedTwist, text_features

    def run(model, tok, task, examples, seed):
        head = _head(task.name)
        cond = None
        if head.cond_size:
            cond = text_features(model, tok, [e.suffix for e in examples])
        potential = task.potential(model, tok, examples)
        return llmsample.smc_generate(
            model,
            tok,
            [e.prompt for e in examples],
            potential=potential,
            twist=LearnedTwist(model, head, condition=cond),  # phi: the run's
            num_particles=n,
            **_common(model, tok, task, examples, seed),
        )

    return run


def _gfn_flow(adapter: str, n):
    """SMC with the GFlowNet policy as the proposal and its implied flow as the twist
    (``llmsample.gfn.FlowTwist``; soft potentials only: it refuses phi = 0 prefixes)."""
    from llmsample.gfn import FlowTwist

    def run(model, tok, task, examples, seed):
        policy = _policy(model.name_or_path, adapter)
        potential = task.potential(model, tok, examples)
        newline = tok("\n", add_special_tokens=False)["input_ids"][-1]
        return llmsample.smc_generate(
            model,
            tok,
            [e.prompt for e in examples],
            potential=potential,
            twist=FlowTwist(policy, model, stop_token_id=newline),
            proposal=policy,
            num_particles=n,
            **_common(model, tok, task, examples, seed),
        )

    return run


def score_texts(model, tok, prompts: list[str], texts: list[str], chat: bool, batch: int = 32):
    """Teacher-forced log p(text + EOS | prompt) under ``model``, per text: ``(sum of the
    token log-probs, number of tokens)``. The text is re-tokenized (no special tokens)
    and the tokenizer's EOS appended: a reply that was cut at ``max_new_tokens`` pays
    for ending there. ``prompts[i]`` goes with ``texts[i]`` (chat: through the template).
    """
    eos = tok.eos_token_id
    out = []
    for s in range(0, len(texts), batch):
        ps, ts = prompts[s : s + batch], texts[s : s + batch]
        ctx = encode_prompts(tok, ps, chat=chat)
        rows = [list(tok(t, add_special_tokens=False)["input_ids"]) + [eos] for t in ts]
        T = max(map(len, rows))
        ids = torch.full((len(rows), T), eos, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
        logp = teacher_force(model, ctx.input_ids, ctx.attention_mask, ids, mask).token_logp
        out += [(float(lp.sum()), len(r)) for lp, r in zip(logp.double(), rows)]
    return out


def _best_of_n(n, k):
    """Importance sampling (q = p), then the particles ranked by (log phi, log p)."""

    def run(model, tok, task, examples, seed):
        out = _smc(n, resample=False)(model, tok, task, examples, seed)
        cands = [
            (b, t) for b, texts in enumerate(out.texts) for t in dict.fromkeys(texts)
        ]  # distinct texts per prompt
        scores = score_texts(
            model, tok, [examples[b].prompt for b, _ in cands], [t for _, t in cands], task.chat
        )
        logp = {c: lp for c, (lp, _) in zip(cands, scores)}
        ctx = encode_prompts(tok, [examples[b].prompt for b, _ in cands], chat=task.chat)
        out.num_forward_tokens += int(ctx.attention_mask.sum()) + sum(m for _, m in scores)
        index = []
        for b, texts in enumerate(out.texts):
            phi = out.log_potential[b].tolist()
            order = sorted(range(n), key=lambda i: (-phi[i], -logp[(b, texts[i])], i))
            first, seen = [], set()  # the best particle of each distinct text, in rank order
            for i in order:
                if texts[i] not in seen:
                    seen.add(texts[i])
                    first.append(i)
            index.append([first[j % len(first)] for j in range(k)])
        out.extras["draw_index"] = index
        out.extras["rerank_logp"] = [
            [logp[(b, t)] for t in texts] for b, texts in enumerate(out.texts)
        ]
        return out

    return run


def _pool_runs(out: SamplingOutput, B: int, K: int, seed: int) -> SamplingOutput:
    """Fold K runs per prompt (rows b*K .. b*K+K-1 of ``out``) into one output of K*n
    particles per prompt; one draw by weight from each run (``extras["draw_index"]``)."""
    n = out.num_particles
    gen = torch.Generator().manual_seed(seed)
    lw_runs = out.log_weights.view(B, K, n)
    log_z_runs = out.log_z.view(B, K)
    log_z = log_z_runs.logsumexp(1) - math.log(K)
    joint = (log_z_runs[..., None] + lw_runs).view(B, K * n)  # pooled: Z_r * w_ri
    norm = joint.logsumexp(1, keepdim=True)
    pooled = torch.where(torch.isfinite(norm), joint - norm, torch.full_like(joint, -math.inf))
    index = []
    for b in range(B):
        row = []
        for r in range(K):
            if torch.isinf(log_z_runs[b, r]):  # a run with no surviving particle
                row.append(r * n)
            else:
                i = torch.multinomial(lw_runs[b, r].exp().float(), 1, generator=gen)
                row.append(r * n + int(i))
        index.append(row)
    return SamplingOutput(
        method="smc-indep",
        sequences=out.sequences.reshape(B, K * n, -1),
        prompt_length=out.prompt_length,
        texts=[sum(out.texts[b * K : (b + 1) * K], []) for b in range(B)],
        log_weights=pooled,
        log_weights_unnormalized=out.log_weights_unnormalized.reshape(B, K * n),
        log_z=log_z,
        ess=out.ess.view(B, K, -1).sum(1),
        resampled=out.resampled.view(B, K, -1).any(1),
        log_potential=None if out.log_potential is None else out.log_potential.reshape(B, K * n),
        num_forward_tokens=out.num_forward_tokens,
        extras=dict(draw_index=index, log_z_runs=log_z_runs.tolist()),
    )


def _smc_indep(n, k, twist=False, guard=False):
    """k independent SMC runs of n // k particles per prompt, one draw from each."""

    def run(model, tok, task, examples, seed):
        rep = [e for e in examples for _ in range(k)]  # prompt-major: run r of prompt b
        out = llmsample.smc_generate(
            model,
            tok,
            [e.prompt for e in rep],
            potential=task.potential(model, tok, rep, twist=twist),
            num_particles=n // k,
            stop_guard=guard,
            **_common(model, tok, task, rep, seed),
        )
        return _pool_runs(out, len(examples), k, seed)

    return run


def _smc_gfn(adapter: str, n):
    """SMC with the GFlowNet policy as the proposal and the prefix twist; the weights are
    exact against p_base * phi. (Untwisted, resampling on p/q would pull the particles
    back to the base model's prefixes: see ``_gfn_is``.)"""

    def run(model, tok, task, examples, seed):
        policy = _policy(model.name_or_path, adapter)
        return _smc(n, twist=True, proposal=policy)(model, tok, task, examples, seed)

    return run


def _commongen_grid(quick: bool, samples: int, adapter: Path) -> list[Method]:
    n, k = N_COMMONGEN, samples
    out = [Method("ancestral", "T=1.0", _ancestral(temperature=1.0, k=n))]
    if not quick:
        out.append(Method("ancestral", "T=0.7", _ancestral(temperature=0.7, k=n)))
        out.append(Method("beam", f"B={n}", _beam(k=n)))
    out.append(Method("best-of-n", f"N={n}", _best_of_n(n, k)))
    if not quick:
        out.append(Method("importance", f"N={n}", _smc(n, resample=False)))
    out.append(Method("smc", f"N={n}", _smc(n)))
    out.append(Method("smc-twist", f"N={n}", _smc(n, twist=True)))
    out.append(Method("smc-indep", f"N={n},K={k}", _smc_indep(n, k)))
    out.append(Method("smc-twist-indep", f"N={n},K={k}", _smc_indep(n, k, twist=True)))
    out.append(Method("smc-guard", f"N={n}", _smc(n, twist=True, guard=True)))
    out.append(Method("smc-guard-indep", f"N={n},K={k}", _smc_indep(n, k, True, True)))
    if not quick:  # 4x the compute: what it takes to leave no concept set without a success
        out.append(Method("smc-guard", f"N={4 * n}", _smc(4 * n, twist=True, guard=True)))
    if (adapter / "adapter_config.json").is_file():
        out.append(Method("gfn", f"K={n}", _gfn(str(adapter), k=n)))
        out.append(Method("smc-gfn", f"N={n}", _smc_gfn(str(adapter), n)))
    return out


# particle counts per task: keywords is a rare event for the tiny model (a line with
# 2-3 given words has probability ~1e-4..1e-2), so it gets more particles
SIZES = {"line-infill": [8, 16, 32], "keywords": [16, 64, 256]}


def methods(
    task_name: str, quick: bool = False, samples: int = 4, adapter: str | Path | None = None
) -> list[Method]:
    """The grid of cells for a task (a smaller one with ``quick``); ``samples`` (draws
    per prompt) sets smc-indep's number of runs (commongen only). The GFlowNet rows
    appear when ``adapter`` (default ``ADAPTERS / task_name``) holds an adapter."""
    adapter = Path(adapter) if adapter is not None else ADAPTERS / task_name
    if task_name == "commongen":
        return _commongen_grid(quick, samples, adapter)
    temps = [1.0] if quick else [0.5, 0.75, 1.0, 1.25, 1.5]
    sizes = [8] if quick else SIZES[task_name]
    out = [Method("ancestral", f"T={t}", _ancestral(temperature=t)) for t in temps]
    if not quick:
        out.append(Method("top-p", "p=0.9", _ancestral(top_p=0.9)))
        out.append(Method("beam", "B=8", _beam()))
    out.append(Method("importance", f"N={sizes[-1]}", _smc(sizes[-1], resample=False)))
    out += [Method("smc", f"N={n}", _smc(n)) for n in sizes]
    out += [Method("smc-twist", f"N={n}", _smc(n, twist=True)) for n in sizes[-2:]]
    if (TWISTS / task_name / "twist_head.pt").is_file():
        out += [Method("smc-learned", f"N={n}", _smc_learned(n)) for n in sizes[-2:]]
    if (adapter / "adapter_config.json").is_file():
        out.append(Method("gfn", "K=8", _gfn(str(adapter))))
        out += [Method("gfn-is", f"N={n}", _gfn_is(str(adapter), n)) for n in sizes[-2:]]
        if task_name == "line-infill":  # a soft potential: the flow twist applies
            out += [Method("gfn-flow", f"N={n}", _gfn_flow(str(adapter), n)) for n in sizes[-2:]]
    return out


def draws(out, k: int, seed: int) -> tuple[list[list[str]], list[list[int]], list[bool]]:
    """``k`` samples per prompt, their particle indices, and whether the method failed
    on the prompt (a weighted method whose every particle was rejected)."""
    texts, index, failed = [], [], []
    gen = torch.Generator().manual_seed(seed)
    chosen = out.extras.get("draw_index")
    for b, lw in enumerate(out.log_weights):
        dead = out.log_z is not None and bool(torch.isinf(out.log_z[b]))
        if chosen is not None:  # the method picked its own draws
            idx = list(chosen[b])
        elif out.log_z is None or dead:  # plain samples (or nothing to weight): take them
            idx = list(range(min(k, lw.numel())))
        else:
            idx = torch.multinomial(lw.exp().float(), k, replacement=True, generator=gen).tolist()
        texts.append([out.texts[b][i] for i in idx])
        index.append(idx)
        failed.append(dead)
    return texts, index, failed
