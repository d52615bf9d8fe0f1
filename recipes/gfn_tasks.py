"""Tasks for ``recipes/gfn_lora.py``: model, prompts, reward and an evaluation per task.

- ``exact``: toy GPT-2 over 8 words + EOS, prompts "a b" and "c d e f", T = 5 (37,449
  complete continuations per prompt), log phi = 2 count("c") - 1.5 count("a"). The
  evaluation enumerates every sequence: exact KL(q||sigma) and KL(sigma||q).
- ``uniform-number`` (after Hu et al. 2024): toy GPT-2 over the digits 0-9 + EOS, prompt
  "4 2", T = 4 (11,111 sequences). R(x) = 1 when x is a canonical integer in [0, 100]
  followed by EOS, else exp(invalid_log_reward); no base-model factor, so sigma is
  (almost exactly) uniform over the 101 numbers. Exact: the fraction of q on valid
  numbers, KL(q(.|valid) || uniform) and KL(uniform || q(.|valid)).
- ``line-infill`` / ``keywords``: the evals' tasks (``llmsample.data.tasks``) on the embedded
  model; the reward is p_base(x|c) times the suffix likelihood (line-infill) or
  exp(-miss_penalty * missing words) (keywords, a softened constraint; SMC with the
  policy as proposal still uses the hard one). The evaluation samples the policy:
  ESS of R/q, an importance estimate of log Z, the ELBO and the unique fraction.
- ``commongen``: CommonGen *training* concept sets (``llmsample.data.commongen``; the evals
  score the dev sets) as chat prompts to ``cfg.model`` (SmolLM2-135M-Instruct in
  ``gfn_commongen.yaml``), ending at the chat template's end of turn. The reward is
  p_base(x|c) * exp(coverage_beta * (coverage - 1)): a soft coverage (a hard 0/1 gives
  most rollouts of a 135M model reward 0 and no gradient signal). The evaluation is the
  lm tasks' policy diagnostics on the first ``eval_prompts`` training sets. With
  ``demonstrations: references`` the training sets' human sentences seed the replay
  buffer, with ``demonstrations: smc`` the base model's covering SMC particles
  (``llmsample.gfn.teacher``, the evals' smc-guard potential): off-policy rows, scored by
  the same reward.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from llmsample.data.tasks import PREFIX_BONUS
from llmsample.data.tasks import build_task as build_eval_task
from llmsample.diagnostics.exact import TOY_EOS, enumerate_target, toy_model, toy_tokenizer
from llmsample.gfn import BaseView, policy_diagnostics
from llmsample.potentials import Potential, Reward

__all__ = ["GFNTask", "build_task", "commongen_reply", "TASKS"]

TASKS = ("exact", "uniform-number", "line-infill", "keywords", "commongen")
DIGITS = [str(d) for d in range(10)]


@dataclass
class GFNTask:
    model: object
    tokenizer: object
    prompts: list[str]
    potential: object  # a Potential, or one per prompt (bind(policy) builds model-based ones)
    stop_ids: list[int]
    max_new_tokens: int
    base_in_reward: bool
    evaluate: object  # (policy, step) -> dict
    bind: object = None  # (policy) -> None: rebuild model-based potentials on BaseView
    chat: bool = False  # prompts are user messages (the tokenizer's chat template)
    demonstrations: list[list[str]] | None = None  # per prompt, human replies (commongen)
    teacher_potential: list | None = None  # per prompt, hard + prefix twist (commongen SMC)


def _soft(texts: list[str]) -> list[float]:
    return [2.0 * t.split().count("c") - 1.5 * t.split().count("a") for t in texts]


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> float:
    return float((log_a.exp() * (log_a - log_b)).sum())


def exact_task(cfg) -> GFNTask:
    model, tok = toy_model("gpt2"), toy_tokenizer(with_pad=True)
    prompts, T = ["a b", "c d e f"], 5
    phi = Reward(_soft, _soft)
    targets = [enumerate_target(model, tok, p, phi, T, TOY_EOS) for p in prompts]

    def evaluate(policy, step):
        out = {}
        for i, (p, target) in enumerate(zip(prompts, targets)):
            log_q = enumerate_target(policy, tok, p, None, T, TOY_EOS).log_p
            out[f"kl_q_sigma/{i}"] = _kl(log_q, target.log_sigma)
            out[f"kl_sigma_q/{i}"] = _kl(target.log_sigma, log_q)
        out["kl_q_sigma"] = sum(out[f"kl_q_sigma/{i}"] for i in range(len(prompts))) / 2
        out["kl_sigma_q"] = sum(out[f"kl_sigma_q/{i}"] for i in range(len(prompts))) / 2
        out["num_sequences"] = len(targets[0].sequences)
        return out

    return GFNTask(model, tok, prompts, phi, [TOY_EOS], T, True, evaluate)


def _number(text: str) -> int | None:
    digits = "".join(text.split())
    if not digits.isdigit() or str(int(digits)) != digits:
        return None  # empty, or a leading zero: not the canonical numeral
    return int(digits)


def uniform_number_task(cfg) -> GFNTask:
    tok = toy_tokenizer(with_pad=True, words=DIGITS)
    eos = len(DIGITS)
    model = toy_model("gpt2", seed=cfg.seed, vocab_size=eos + 1)
    prompts, T, lo, hi = ["4 2"], 4, 0, 100
    bad = cfg.invalid_log_reward

    def score(texts):
        return [0.0 if (n := _number(t)) is not None and lo <= n <= hi else bad for t in texts]

    phi = Reward(score)
    valid = [tuple(int(c) for c in str(n)) + (eos,) for n in range(lo, hi + 1)]

    def evaluate(policy, step):
        target = enumerate_target(policy, tok, prompts[0], phi, T, eos)
        index = target.index()
        log_q_all = target.log_p  # the policy's own q over every sequence
        log_q = torch.stack([log_q_all[index[s]] for s in valid])  # [101]
        frac = float(log_q.logsumexp(0).exp())
        cond = log_q - log_q.logsumexp(0)
        uniform = torch.full_like(cond, -math.log(len(valid)))
        log_sigma = target.log_phi - target.log_phi.logsumexp(0)  # R alone, normalized
        return {
            "valid_fraction": frac,
            "kl_to_uniform": _kl(cond, uniform),
            "kl_uniform_to_q": _kl(uniform, cond),
            "kl_q_sigma": _kl(log_q_all, log_sigma),
            "num_sequences": len(target.sequences),
        }

    return GFNTask(model, tok, prompts, phi, [eos], T, False, evaluate)


def lm_task(cfg) -> GFNTask:
    import llmsample
    from llmsample.hf.prompts import line_end_ids
    from llmsample.potentials import PerPrompt, SuffixLikelihood

    model, tok = llmsample.load_model(cfg.model, device=cfg.device)
    task = build_eval_task(cfg.task, num_prompts=cfg.num_prompts, seed=cfg.task_seed)
    examples = task.examples
    prompts = [e.prompt for e in examples]
    stop_ids = line_end_ids(tok)
    holder = GFNTask(model, tok, prompts, None, stop_ids, task.max_new_tokens, True, None)

    def bind(policy):
        base = BaseView(policy)
        if cfg.task == "line-infill":
            holder.potential = [SuffixLikelihood(base, tok, e.suffix) for e in examples]
        else:
            holder.potential = [_soft_contains(e.words, cfg.miss_penalty) for e in examples]

    def evaluate(policy, step):
        shown = prompts[: cfg.eval_prompts]
        return policy_diagnostics(
            policy,
            tok,
            shown,
            PerPrompt(holder.potential[: cfg.eval_prompts]),
            num_samples=cfg.eval_samples,
            max_new_tokens=task.max_new_tokens,
            stop_ids=stop_ids,
            seed=cfg.seed,
        )

    holder.evaluate, holder.bind = evaluate, bind
    return holder


def commongen_reply(reference: str) -> str:
    """A CommonGen reference as a chat reply: detokenized (``"park ."`` -> ``"park."``),
    capitalized, ending in a full stop."""
    text = re.sub(r" ([.,!?;:'])", r"\1", reference.strip())
    text = text[:1].upper() + text[1:]
    return text if text[-1:] in ".!?" else text + "."


def commongen_task(cfg) -> GFNTask:
    import random

    import llmsample
    from llmsample.data.commongen import commongen_prompt, load_commongen
    from llmsample.potentials import PerPrompt
    from llmsample.potentials.concepts import ConceptCoverage, Concepts

    model, tok = llmsample.load_model(cfg.model, device=cfg.device)
    train = load_commongen("train")
    n = min(cfg.num_prompts, len(train))
    rows = random.Random(cfg.task_seed).sample(range(len(train)), n)
    sets = [list(train[i]["concepts"]) for i in rows]
    prompts = [commongen_prompt(c) for c in sets]
    potential = [ConceptCoverage(*c, beta=cfg.coverage_beta) for c in sets]
    stop_ids = [tok.eos_token_id]  # the chat template's end of turn
    T = 32  # as the eval: 99.4% of the dev references fit in 32 SmolLM2 tokens

    def evaluate(policy, step):
        return policy_diagnostics(
            policy,
            tok,
            prompts[: cfg.eval_prompts],
            PerPrompt(potential[: cfg.eval_prompts]),
            num_samples=cfg.eval_samples,
            max_new_tokens=T,
            stop_ids=stop_ids,
            seed=cfg.seed,
            chat=True,
        )

    refs = [[commongen_reply(r) for r in train[i]["references"]] for i in rows]
    # the evals' smc-guard potential: hard coverage, with its prefix twist
    hard = [Concepts(*c, prefix_bonus=PREFIX_BONUS) for c in sets]
    return GFNTask(
        model,
        tok,
        prompts,
        potential,
        stop_ids,
        T,
        True,
        evaluate,
        chat=True,
        demonstrations=refs,
        teacher_potential=hard,
    )


def _soft_contains(words, penalty: float) -> Potential:
    import regex

    pats = [regex.compile(rf"(?<!\w){regex.escape(w)}(?!\w)", regex.IGNORECASE) for w in words]

    def score(texts):
        return [-penalty * sum(not p.search(t) for p in pats) for t in texts]

    return Reward(score)


def build_task(cfg) -> GFNTask:
    if cfg.task == "exact":
        return exact_task(cfg)
    if cfg.task == "uniform-number":
        return uniform_number_task(cfg)
    if cfg.task == "commongen":
        return commongen_task(cfg)
    return lm_task(cfg)
