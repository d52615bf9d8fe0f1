"""Contrastive twist learning (CTL) of a twist head, checked against the exact optimal twist.

    accelerate launch recipes/twist_ctl.py --config recipes/configs/twist_ctl_exact.yaml
    python recipes/twist_ctl.py --config recipes/configs/twist_ctl_exact.yaml --steps 50
    accelerate launch recipes/twist_ctl.py --config recipes/configs/twist_ctl_line_infill.yaml

Task ``line-infill`` (amortized over synthetic infilling problems with exact positives)
lives in ``recipes/twist_ctl_infill.py``; its docstring says what it measures.

Task ``exact`` (as in ``recipes/gfn_tasks.py``): toy GPT-2 over 8 words + EOS, prompts
"a b" and "c d e f", T = 5 (37,449 complete continuations per prompt), log phi =
2 count("c") - 1.5 count("a"). A :class:`llmsample.TwistHead` on the frozen model is
trained by :func:`llmsample.ctl.trainer.train_ctl` (checkpoints in ``<out_dir>/checkpoints``:
rerun the same command to resume; the head lands in ``<out_dir>/twist_head.pt``). The
evaluation (step 0 = the zero head, i.e. plain SMC, and after training) enumerates
every prefix:

- **twist error** against psi*(y) = E_p[phi | y] (``ExactTarget.log_psi``) over the
  running prefixes y of t = 1..T-1 tokens, weighted by their sigma mass:
  ``twist_mae`` = E|log psi - log psi*| (what the locally optimal proposal sees: it
  weighs psi against phi at EOS), and ``twist_mae_centered`` after removing, per
  prompt and step t, the sigma-weighted mean of the difference: with the base proposal
  SMC's weights and resampling are invariant to such a per-step constant (all running
  particles are at the same step, and phi replaces psi at completion), so this is the
  part that matters there. ``ctl_kl`` = sum_t KL(sigma_t || pi_t), the exact CTL
  objective (0 iff psi = psi* on the support).
- **Var(log Z_hat)** across ``eval_seeds`` seeds at N = ``eval_particles``: no twist
  vs the learned twist (base proposal) vs the learned twist with q ∝ p·psi.
- **TV to sigma** of ``tv_seeds`` runs of ``tv_particles`` particles against the 99% TV
  of floor(ESS) exact iid draws (``ExactTarget.tv_noise_floor``). That floor holds for
  iid weighted draws (the optimal-proposal runs, which hardly resample; exact_optimal is
  the exact sampler itself) but is too tight after resampling (descendants of one
  ancestor are not independent: the exact twist fails it too), so base-proposal twisted
  runs are compared with the exact twist's at the same N, and the TV of the
  seed-averaged distribution separates noise (it shrinks) from bias (it would not).

Everything goes to ``<out_dir>/summary.json``, each figure with the step it was
measured at. A rerun of the same command resumes from the newest checkpoint (only the
fields in ``RESUMABLE_FIELDS`` may change; ``--overwrite`` starts afresh); SIGINT /
SIGTERM stop it after a checkpoint (the post-training checks are then skipped) with
exit status 130 / 143; a config error exits with status 2.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from llmsample.config import help_field, run_recipe
from llmsample.ctl.head import LearnedTwist, TwistHead
from llmsample.ctl.trainer import CTLConfig, train_ctl
from llmsample.diagnostics.exact import (
    TOY_EOS,
    ExactTarget,
    enumerate_target,
    toy_model,
    toy_tokenizer,
)
from llmsample.generate import smc_generate
from llmsample.hf.prompts import encode_prompts
from llmsample.hf.session import vocab_size
from llmsample.potentials import Reward
from llmsample.provenance import provenance
from llmsample.smc.resampling import ess
from llmsample.train.checkpoints import check_resume, signal_stop
from llmsample.twists import Twist

TASKS = ("exact", "line-infill")


@dataclass
class TwistCTLRecipeConfig(CTLConfig):
    task: str = help_field(f"one of {', '.join(TASKS)}", "exact")
    head_width: int = help_field("hidden units of the twist head's MLP (0 = linear head)", 128)
    tied_head: bool = help_field(
        "score tokens through the LM's frozen output embeddings (TwistHead.tied)", False
    )
    num_threads: int = help_field("torch.set_num_threads (0 = torch default)", 0)
    eval_particles: int = help_field("N of the Var(log Z_hat) comparison", 16)
    eval_seeds: int = help_field(
        "seeds (independent SMC runs) of the Var(log Z_hat) comparison", 20
    )
    tv_particles: int = help_field("N of the TV-to-sigma runs (0 skips them)", 4096)
    tv_seeds: int = help_field("seeds (runs) of each TV-to-sigma check", 5)
    model: str = help_field("line-infill: the base model (name or path)", "shakespeare-tiny")
    num_problems: int = help_field("line-infill: synthetic training problems", 2000)
    suffix_tokens: int = help_field("line-infill: tokens of each sampled suffix", 12)
    eval_problems: int = help_field(
        "line-infill: held-out synthetic problems of the evaluation", 64
    )

    # tv_*: the post-training TV checks only (never seen during training)
    RESUMABLE_FIELDS = (*CTLConfig.RESUMABLE_FIELDS, "num_threads", "tv_particles", "tv_seeds")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.head_width < 0 or self.num_threads < 0 or self.tv_particles < 0:
            raise ValueError("head_width, num_threads and tv_particles must be >= 0")
        if self.tv_seeds < 1:
            raise ValueError("tv_seeds must be >= 1")
        if self.eval_particles < 1 or self.eval_seeds < 2:
            raise ValueError("eval_particles must be >= 1 and eval_seeds >= 2")
        if min(self.num_problems, self.suffix_tokens, self.eval_problems) < 1:
            raise ValueError("num_problems, suffix_tokens and eval_problems must be >= 1")
        if self.task == "line-infill" and self.positives != "given":
            raise ValueError(
                "task line-infill trains from the exact samples of its synthetic problems: "
                "set positives: given"
            )


def soft(texts: list[str]) -> list[float]:
    """log phi of the exact task (same as recipes/gfn_tasks.py)."""
    return [2.0 * t.split().count("c") - 1.5 * t.split().count("a") for t in texts]


def exact_task():
    model, tok = toy_model("gpt2"), toy_tokenizer(with_pad=True)
    return model, tok, ["a b", "c d e f"], Reward(soft), 5


# ---------------------------------------------------------------------------- twist error
def prefix_table(target: ExactTarget) -> dict[tuple[int, ...], float]:
    """sigma mass of every running (incomplete, non-empty) prefix: sum of sigma over the
    complete continuations extending it."""
    mass: dict[tuple[int, ...], float] = {}
    for s, m in zip(target.sequences, target.log_sigma.exp().tolist()):
        for k in range(1, len(s)):
            mass[s[:k]] = mass.get(s[:k], 0.0) + m
    return mass


@torch.no_grad()
def head_log_psi(model, head, prompt_ids: list[int], prefixes) -> dict[tuple[int, ...], float]:
    """The head's log psi of each (running, non-empty) prefix: head(h(prefix[:-1]))[last]."""
    parents = sorted({y[:-1] for y in prefixes}, key=len)
    scores = {}
    for depth in sorted({len(p) for p in parents}):
        group = [p for p in parents if len(p) == depth]
        ids = torch.tensor([prompt_ids + list(p) for p in group])
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
        s = head(out.hidden_states[-1][:, -1]).double()
        scores.update(zip(group, s))
    return {y: float(scores[y[:-1]][y[-1]]) for y in prefixes}


def twist_error(model, head, prompt_ids: list[int], target: ExactTarget, T: int) -> dict:
    """sigma-weighted |log psi - log psi*| over running prefixes (raw and per-step centered)
    and the exact CTL objective sum_t KL(sigma_t || pi_t)."""
    mass = prefix_table(target)
    learned = head_log_psi(model, head, prompt_ids, list(mass))
    diff = {y: learned[y] - target.log_psi[y] for y in mass}
    total = sum(mass.values())
    raw = sum(mass[y] * abs(d) for y, d in diff.items()) / total
    centered, kl, per_step = 0.0, 0.0, {}
    log_z = target.log_z
    complete_at = {}
    for s, lp, lf in zip(target.sequences, target.log_p.tolist(), target.log_phi.tolist()):
        if s[-1] == TOY_EOS and len(s) < T:
            complete_at.setdefault(len(s), []).append((lp, lf))
    for t in range(1, T):
        ys = [y for y in mass if len(y) == t]
        m = torch.tensor([mass[y] for y in ys], dtype=torch.float64)
        d = torch.tensor([diff[y] for y in ys], dtype=torch.float64)
        c = float((m * d).sum() / m.sum())
        centered += float((m * (d - c).abs()).sum())
        per_step[t] = dict(mae=float((m * d.abs()).sum() / m.sum()), offset=c)
        # Y_t: running prefixes (log p = log mass + log Z - log psi*) and completions at t
        psi_star = torch.tensor([target.log_psi[y] for y in ys], dtype=torch.float64)
        log_p = m.log() + log_z - psi_star
        done = torch.tensor(complete_at.get(t, []), dtype=torch.float64).view(-1, 2)
        sig = torch.cat([log_p + psi_star, done[:, 0] + done[:, 1]])
        pi = torch.cat([log_p + psi_star + d, done[:, 0] + done[:, 1]])
        sig, pi = sig - sig.logsumexp(0), pi - pi.logsumexp(0)
        kl += float((sig.exp() * (sig - pi)).sum())
    return dict(twist_mae=raw, twist_mae_centered=centered / total, ctl_kl=kl, per_step=per_step)


# ---------------------------------------------------------------------------- SMC checks
class ExactTwist(Twist):
    """The optimal twist psi* read off the enumeration (phi on completing extensions): the
    reference a learned twist is compared with."""

    def __init__(self, targets: list[ExactTarget]):
        self.targets = targets
        self.phi = [dict(zip(t.sequences, t.log_phi.tolist())) for t in targets]

    def prefix(self, x):
        rows = zip(x.prompt_index.tolist(), x.token_lists())
        return torch.tensor(
            [self.targets[b].log_psi[tuple(s)] for b, s in rows], dtype=torch.float64
        )

    def next_token(self, x):
        out = []
        for b, s in zip(x.prompt_index.tolist(), x.token_lists()):
            last = len(s) + 1 == x.max_new_tokens
            out.append(
                [
                    self.phi[b][(*s, v)]
                    if v == TOY_EOS or last
                    else self.targets[b].log_psi[(*s, v)]
                    for v in range(x.vocab_size)
                ]
            )
        return torch.tensor(out, dtype=torch.float64)


def _continuations(out, b: int) -> list[tuple[int, ...]]:
    rows = out.continuations[b].tolist()
    return [tuple(r[: r.index(TOY_EOS) + 1] if TOY_EOS in r else r) for r in rows]


def log_z_spread(model, tok, prompts, potential, twist, proposal, targets, N, seeds, T) -> dict:
    """Var and bias of log Z_hat across seeds (one SMC run per seed and prompt)."""
    runs = []
    for seed in range(seeds):
        out = smc_generate(
            model,
            tok,
            prompts,
            potential=potential,
            twist=twist,
            proposal=proposal,
            num_particles=N,
            max_new_tokens=T,
            seed=seed,
        )
        runs.append(out.log_z)
    lz = torch.stack(runs)  # [seeds, B]
    exact = torch.tensor([t.log_z for t in targets], dtype=torch.float64)
    ratio = (lz - exact).exp()
    return dict(
        var_log_z=[float(v) for v in lz.var(dim=0)],
        mean_var_log_z=float(lz.var(dim=0).mean()),
        bias_log_z=[float(v) for v in (lz.mean(0) - exact)],
        z_ratio_mean=[float(v) for v in ratio.mean(0)],
        z_ratio_se=[float(v) for v in ratio.std(0) / math.sqrt(seeds)],
    )


def tv_check(model, tok, prompts, potential, twist, proposal, targets, N, T, seeds) -> dict:
    """TV(weighted particles, sigma) of one run per seed, against the 99% TV of floor(ESS)
    exact iid draws. That floor is exact for iid weighted draws (no resampling) but too
    tight after resampling (descendants of one ancestor are not independent), so SMC
    runs are also compared with the exact twist's runs (see ``_smc_checks``)."""
    rows, mean_dist = [], [torch.zeros(len(t.sequences), dtype=torch.float64) for t in targets]
    for seed in range(seeds):
        out = smc_generate(
            model,
            tok,
            prompts,
            potential=potential,
            twist=twist,
            proposal=proposal,
            num_particles=N,
            max_new_tokens=T,
            seed=seed,
        )
        for b, target in enumerate(targets):
            samples = _continuations(out, b)
            m = int(ess(out.log_weights[b]))
            mean_dist[b] += target.empirical(samples, out.log_weights[b]) / seeds
            rows.append(
                dict(
                    seed=seed,
                    prompt=b,
                    tv=target.tv(samples, out.log_weights[b]),
                    floor=target.tv_noise_floor(m, q=0.99),
                    ess=m,
                    tv_unweighted=target.tv(samples),
                    resample_rate=float(out.resampled[b].float().mean()),
                )
            )
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("tv", "floor", "ess")}
    return dict(
        runs=rows,
        mean_tv=mean["tv"],
        max_tv=max(r["tv"] for r in rows),
        mean_floor=mean["floor"],
        mean_ess=mean["ess"],
        within_floor=sum(r["tv"] < r["floor"] for r in rows) / len(rows),
        mean_tv_unweighted=sum(r["tv_unweighted"] for r in rows) / len(rows),
        # TV of the seed-average of the weighted empirical distributions: it shrinks with
        # more seeds for a consistent sampler (noise), not for a biased one
        tv_of_seed_mean=[
            0.5 * float((d - t.log_sigma.exp()).abs().sum()) for d, t in zip(mean_dist, targets)
        ],
    )


def _command() -> str:
    """The command line that ran this script, as one shell string."""
    return shlex.join(["python", *sys.argv])


def _machine() -> dict:
    """``machine`` and ``provenance`` (the commit and command behind the file) entries."""
    prov = provenance(_command())
    return dict(machine={k: prov[k] for k in ("cpu", "torch", "threads")}, provenance=prov)


def _header(cfg: TwistCTLRecipeConfig) -> dict:
    """The summary's first entries: the task, the command that ran and the config."""
    return dict(task=cfg.task, command=_command(), config=dataclasses.asdict(cfg))


def _ctl_fields(cfg: TwistCTLRecipeConfig) -> dict:
    """The settings of ``cfg`` that :class:`CTLConfig` (the trainer's config) has."""
    names = {f.name for f in dataclasses.fields(CTLConfig)}
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k in names}


def _prepare(out: Path, cfg: TwistCTLRecipeConfig) -> None:
    """Refuse a conflicting resume, clear ``--overwrite``'s outputs and set the threads."""
    check_resume(out, cfg)  # refuse early, before the targets or problems are built
    if cfg.overwrite:  # the trainer deletes the checkpoints and metrics.jsonl
        for name in ("summary.json", "twist_head.pt", "problems.json"):
            (out / name).unlink(missing_ok=True)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)


def _make_head(cfg: TwistCTLRecipeConfig, model) -> TwistHead:
    """The head to train: scoring through the LM's output embeddings (tied) or its own."""
    if cfg.tied_head:
        return TwistHead.tied(model, width=cfg.head_width)
    return TwistHead(model.config.hidden_size, vocab_size(model), width=cfg.head_width)


def _evaluator(model, prompt_ids: list[list[int]], targets: list[ExactTarget], T: int):
    """The trainer's ``evaluate(head, step)``: :func:`twist_error` per prompt and the means."""

    def evaluate(h, step) -> dict:
        was = h.training
        h.eval()
        res = {}
        for i, (ids, target) in enumerate(zip(prompt_ids, targets)):
            for k, v in twist_error(model, h, ids, target, T).items():
                res[f"{k}/{i}"] = v
        for k in ("twist_mae", "twist_mae_centered", "ctl_kl"):
            res[k] = sum(res[f"{k}/{i}"] for i in range(len(targets))) / len(targets)
        h.train(was)
        return res

    return evaluate


def _base_and_trained(log: Path) -> dict:
    """``base`` and ``trained``: the first and last evaluation of the log, each with its step."""
    events = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    evals = [e for e in events if e.get("event") == "eval"]
    if not evals:
        return {}
    return dict(
        base={k: v for k, v in evals[0].items() if "/" not in k},
        trained={k: v for k, v in evals[-1].items() if "/" not in k},
    )


def _samplers(exact: ExactTwist, learned: LearnedTwist) -> tuple:
    """(name, twist, proposal) of each SMC sampler the checks compare."""
    return (
        ("none", "none", None),
        ("exact", exact, None),
        ("exact_optimal", exact, "optimal"),  # exact iid draws from sigma
        ("learned", learned, None),
        ("learned_optimal", learned, "optimal"),
    )


def _smc_checks(cfg: TwistCTLRecipeConfig, smc: tuple, head, targets, T: int) -> tuple[dict, dict]:
    """Var(log Z_hat) and TV to sigma of each sampler (``smc``: model, tok, prompts,
    potential); returns the summary's entries and their timings."""
    t0 = time.time()
    head.eval()
    model, _, _, potential = smc
    learned = LearnedTwist(model, head, potential)
    samplers = _samplers(ExactTwist(targets), learned)
    spread_args = (targets, cfg.eval_particles, cfg.eval_seeds, T)
    spread = {n: log_z_spread(*smc, tw, q, *spread_args) for n, tw, q in samplers}
    timings = dict(log_z_spread_s=round(time.time() - t0, 1))
    t0 = time.time()
    tv = {}
    if cfg.tv_particles:
        tv_args = (targets, cfg.tv_particles, T, cfg.tv_seeds)
        for name, twist, proposal in samplers:
            tv[name] = tv_check(*smc, twist, proposal, *tv_args)
        # after resampling the floor(ESS) floor is too tight (it fails the exact twist too):
        # compare with the exact twist, a correct sampler of the same kind at the same N
        tv["learned_vs_exact_twist_mean_tv"] = tv["learned"]["mean_tv"] / tv["exact"]["mean_tv"]
    checks = dict(
        log_z_spread=spread,
        var_ratio_learned_vs_none=spread["learned"]["mean_var_log_z"]
        / spread["none"]["mean_var_log_z"],
        tv=tv,
    )
    return checks, timings | dict(tv_s=round(time.time() - t0, 1))


def _run_exact(cfg: TwistCTLRecipeConfig, out: Path, start: float) -> dict:
    """Task ``exact``: train the head, then the SMC checks (skipped if stopped by a signal)."""
    model, tok, prompts, potential, T = exact_task()
    targets = [enumerate_target(model, tok, p, potential, T, TOY_EOS) for p in prompts]
    prompt_ids = [encode_prompts(tok, [p]).input_ids[0].tolist() for p in prompts]
    head = _make_head(cfg, model)
    train_cfg = CTLConfig(**_ctl_fields(cfg) | dict(max_new_tokens=T))
    evaluate = _evaluator(model, prompt_ids, targets, T)
    t0 = time.time()
    result = train_ctl(
        model, tok, prompts, potential, head, train_cfg, evaluate=evaluate, run_config=cfg
    )
    timings = dict(train_s=round(time.time() - t0, 1))
    summary = _header(cfg) | dict(
        num_sequences=len(targets[0].sequences),
        exact_log_z=[t.log_z for t in targets],
        # final: the step reached, finished, stopped_by and the last evaluation's
        # metrics, measured at final["eval_step"] (not necessarily final["step"])
        final=result,
        stopped_by_signal=signal_stop(result["stopped_by"], result["step"]),
    )
    summary |= _base_and_trained(out / "metrics.jsonl")
    if result["stopped_by"] not in ("SIGINT", "SIGTERM"):  # no checks once asked to stop
        checks, check_timings = _smc_checks(cfg, (model, tok, prompts, potential), head, targets, T)
        summary |= dict(checks_step=result["step"], **checks)  # the head of log_z_spread and tv
        timings |= check_timings
    return summary | dict(wall_s=round(time.time() - start, 1), timings=timings, **_machine())


def main(cfg: TwistCTLRecipeConfig) -> dict:
    """Train and evaluate; returns the summary (also written to ``<out_dir>/summary.json``).
    Raises :class:`llmsample.train.checkpoints.ResumeConflict` before any work if ``out_dir``
    holds a checkpoint of a run with other settings."""
    out = Path(cfg.out_dir)
    _prepare(out, cfg)
    start = time.time()
    torch.manual_seed(cfg.seed)
    if cfg.task == "line-infill":
        from twist_ctl_infill import run_infill

        summary = _header(cfg)
        summary |= run_infill(cfg, _ctl_fields(cfg))
        summary |= dict(wall_s=round(time.time() - start, 1), **_machine())
    else:
        summary = _run_exact(cfg, out, start)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    sys.exit(run_recipe(TwistCTLRecipeConfig, main, __doc__))
