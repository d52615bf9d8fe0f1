"""The samplers compared by the evals, as (method, knob) cells.

Every method returns a :class:`llmsample.SamplingOutput`; :func:`draws` turns it into
``k`` samples per prompt: posterior draws by weight for weighted methods (SMC,
importance sampling), the samples themselves for plain ones (ancestral, beam).
Continuations end at the end of their line (``line_end_ids``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

import llmsample
from llmsample.lm import line_end_ids
from llmsample.proposals import LMProposal

__all__ = ["Method", "methods", "draws", "ADAPTERS", "TWISTS"]

# GFlowNet LoRA policies trained by recipes/configs/gfn_<task>.yaml, one per task
ADAPTERS = Path(__file__).resolve().parent / "adapters"
# CTL twist heads trained by recipes/configs/twist_ctl_<task>.yaml, one per task
TWISTS = Path(__file__).resolve().parent / "twists"


@dataclass(frozen=True)
class Method:
    name: str
    knob: str
    run: Callable  # (model, tokenizer, task, examples, seed) -> SamplingOutput

    @property
    def key(self) -> str:
        return f"{self.name}[{self.knob}]"


def _common(model, tok, task, examples, seed):
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
        )

    return run


def _smc(n, twist=False, resample=True, proposal=None):
    def run(model, tok, task, examples, seed):
        fn = llmsample.smc_generate if resample else llmsample.importance_generate
        return fn(
            model,
            tok,
            [e.prompt for e in examples],
            potential=task.potential(model, tok, examples, twist=twist),
            twist="prefix" if twist else "none",
            num_particles=n,
            proposal=proposal or LMProposal(),
            **_common(model, tok, task, examples, seed),
        )

    return run


@lru_cache(maxsize=2)
def _policy(model_name: str, task_name: str):
    """The task's GFlowNet policy: its own copy of the base model plus the adapter, so
    the base model that every other method (and every potential) uses stays clean."""
    policy, _ = llmsample.load_model(model_name, adapter=str(ADAPTERS / task_name))
    return policy


def _gfn(k=8):
    """Plain samples from the GFlowNet policy (unweighted, like ancestral sampling)."""

    def run(model, tok, task, examples, seed):
        return llmsample.ancestral_generate(
            _policy(model.name_or_path, task.name),
            tok,
            [e.prompt for e in examples],
            num_samples=k,
            potential=task.potential(model, tok, examples),
            **_common(model, tok, task, examples, seed),
        )

    return run


def _gfn_is(n):
    """The GFlowNet policy as the proposal, weights p_base phi / q (importance sampling).

    No resampling: without a twist, SMC's intermediate weights p(x_<=t) / q(x_<=t) would
    pull particles back towards the base model's prefix marginals, undoing the policy.
    (With the policy's own implied flow as the twist every intermediate weight is 1, and
    SMC reduces to exactly this.)
    """

    def run(model, tok, task, examples, seed):
        policy = _policy(model.name_or_path, task.name)
        return _smc(n, resample=False, proposal=policy)(model, tok, task, examples, seed)

    return run


@lru_cache(maxsize=2)
def _head(task_name: str):
    from llmsample.twist_head import TwistHead

    return TwistHead.load(TWISTS / task_name / "twist_head.pt").eval()


def _smc_learned(n):
    """SMC with the task's learned (CTL) twist; a conditional head reads each prompt's
    suffix (line-infill) through ``text_features``."""
    from llmsample.twist_head import LearnedTwist, text_features

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
            twist=LearnedTwist(model, head, potential, condition=cond),
            num_particles=n,
            **_common(model, tok, task, examples, seed),
        )

    return run


def _gfn_flow(n):
    """SMC with the GFlowNet policy as the proposal and its implied flow as the twist
    (``llmsample.gfn.FlowTwist``; soft potentials only: it refuses phi = 0 prefixes)."""
    from llmsample.gfn import FlowTwist

    def run(model, tok, task, examples, seed):
        policy = _policy(model.name_or_path, task.name)
        potential = task.potential(model, tok, examples)
        newline = tok("\n", add_special_tokens=False)["input_ids"][-1]
        return llmsample.smc_generate(
            model,
            tok,
            [e.prompt for e in examples],
            potential=potential,
            twist=FlowTwist(policy, model, potential, stop_token_id=newline),
            proposal=policy,
            num_particles=n,
            **_common(model, tok, task, examples, seed),
        )

    return run


# particle counts per task: keywords is a rare event for the tiny model (a line with
# 2-3 given words has probability ~1e-4..1e-2), so it gets more particles
SIZES = {"line-infill": [8, 16, 32], "keywords": [16, 64, 256]}


def methods(task_name: str, quick: bool = False) -> list[Method]:
    """The grid of cells for a task (a smaller one with ``quick``)."""
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
    if (ADAPTERS / task_name / "adapter_config.json").is_file():
        out.append(Method("gfn", "K=8", _gfn()))
        out += [Method("gfn-is", f"N={n}", _gfn_is(n)) for n in sizes[-2:]]
        if task_name == "line-infill":  # a soft potential: the flow twist applies
            out += [Method("gfn-flow", f"N={n}", _gfn_flow(n)) for n in sizes[-2:]]
    return out


def draws(out, k: int, seed: int) -> tuple[list[list[str]], list[list[int]], list[bool]]:
    """``k`` samples per prompt, their particle indices, and whether the method failed
    on the prompt (a weighted method whose every particle was rejected)."""
    texts, index, failed = [], [], []
    gen = torch.Generator().manual_seed(seed)
    for b, lw in enumerate(out.log_weights):
        dead = out.log_z is not None and bool(torch.isinf(out.log_z[b]))
        if out.log_z is None or dead:  # plain samples (or nothing to weight): take them
            idx = list(range(min(k, lw.numel())))
        else:
            idx = torch.multinomial(lw.exp().float(), k, replacement=True, generator=gen).tolist()
        texts.append([out.texts[b][i] for i in idx])
        index.append(idx)
        failed.append(dead)
    return texts, index, failed
