"""The ``line-infill`` task of ``recipes/twist_ctl.py``: an amortized twist for infilling.

    accelerate launch recipes/twist_ctl.py --config recipes/configs/twist_ctl_line_infill.yaml

Problems are synthetic, as in Zhao et al. 2024: for a context c (speaker and a verse
line, from the *training* plays) draw the middle line x ~ p(x | c) and then the next
``suffix_tokens`` tokens s ~ p(s | c, x) from the model itself
(:func:`llmsample.diagnostics.bounds.joint_infill_samples`). x is then an exact draw from the
target sigma(x | c, s) ∝ p(x | c) p(s | c, x), so CTL takes it as its positive
(``positives: given``: no SMC needed for positives), and twisted draws from
q ∝ p·psi as negatives. The head reads the base model's hidden state and the suffix
(``text_features``: the mean hidden state over s), so one head serves every problem.
The problems are saved to ``<out_dir>/problems.json`` (a resumed run reuses them).

The evaluation (step 0 = the zero head, i.e. plain SMC, then every ``eval_every`` steps)
runs SMC with the twist on ``eval_problems`` synthetic problems from the held-out plays
(the contexts of the evals' line-infill prompts, ``llmsample.data.tasks``, with suffixes
drawn from the model): the mean log Z_hat, a lower bound on the mean log Z, higher is
better. The bounds against untwisted SMC and the other samplers are in
``evals/infill_bounds.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import llmsample
from llmsample.ctl.head import LearnedTwist, TwistHead, text_features
from llmsample.data.shakespeare import DEFAULT_HELDOUT, list_plays
from llmsample.data.tasks import build_task
from llmsample.diagnostics.bounds import joint_infill_samples
from llmsample.generate import smc_generate
from llmsample.hf.prompts import line_end_ids
from llmsample.hf.session import vocab_size
from llmsample.potentials import SuffixLikelihood
from llmsample.train.checkpoints import signal_stop

__all__ = ["infill_problems", "run_infill"]


def _prompts(num: int, seed: int, heldout: bool) -> tuple[list[str], int]:
    plays = DEFAULT_HELDOUT if heldout else [p for p in list_plays() if p not in DEFAULT_HELDOUT]
    task = build_task("line-infill", num_prompts=num, seed=seed, plays=tuple(plays))
    return [e.prompt for e in task.examples], task.max_new_tokens


def infill_problems(
    model, tok, num: int, suffix_tokens: int, seed: int, heldout: bool, cache: Path | None = None
) -> dict:
    """``num`` synthetic infilling problems {prompts, suffixes, references, T} from the
    training plays (or the held-out ones), drawn in chunks; read from ``cache`` if there."""
    settings = dict(num=num, suffix_tokens=suffix_tokens, seed=seed, heldout=heldout)
    if cache is not None and cache.is_file():
        saved = json.loads(cache.read_text())
        if {k: saved.get(k) for k in settings} != settings:
            raise ValueError(
                f"{cache} holds problems made with other settings "
                f"({ {k: saved.get(k) for k in settings} }, not {settings}); a run resumed "
                "on other problems would mix them: use another out_dir, or pass --overwrite to "
                "start fresh"
            )
        return saved
    prompts, T = _prompts(num, seed, heldout)
    suffixes, refs = [], []
    for i in range(0, len(prompts), 128):
        chunk = joint_infill_samples(
            model, tok, prompts[i : i + 128], T, suffix_tokens, seed=seed + i
        )
        suffixes += chunk.suffixes
        refs += [list(r) for r in chunk.references]
    out = dict(
        **settings,
        T=T,
        prompts=prompts,
        suffixes=suffixes,
        references=refs,
    )
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(out))
    return out


def _evaluator(cfg, model, tok, held: dict, T: int, eos):
    """The held-out check: log Z of SMC with the head's twist on the held-out problems
    (``cfg.eval_seeds`` runs): its mean (a lower bound on log Z), SE and variance."""
    held_pot = SuffixLikelihood(model, tok, held["suffixes"])
    held_cond = text_features(model, tok, held["suffixes"])

    def evaluate(h, step) -> dict:
        was = h.training
        h.eval()
        twist = LearnedTwist(model, h, held_pot, condition=held_cond)
        runs = [
            smc_generate(
                model,
                tok,
                held["prompts"],
                potential=held_pot,
                twist=twist,
                num_particles=cfg.eval_particles,
                max_new_tokens=T,
                eos_token_id=eos,
                seed=seed,
            ).log_z
            for seed in range(cfg.eval_seeds)
        ]
        lz = torch.stack(runs)  # [seeds, problems]
        h.train(was)
        return dict(
            lower_bound=float(lz.mean()),
            lower_bound_se=float(lz.mean(0).std() / len(held["prompts"]) ** 0.5),
            var_log_z=float(lz.var(0).mean()),
        )

    return evaluate


def _summary(log: Path, result: dict, num_problems: int, T: int) -> dict:
    """The run's summary: the trainer's result, the first and last evaluation and the gain."""
    events = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    evals = [e for e in events if e.get("event") == "eval"]
    summary = dict(
        # final: the last evaluation's metrics, measured at final["eval_step"]
        final=result,
        stopped_by_signal=signal_stop(result["stopped_by"], result["step"]),
        num_problems=num_problems,
        T=T,
    )
    if evals:  # each with its "step"
        summary["base"], summary["trained"] = evals[0], evals[-1]
        summary["lower_bound_gain"] = evals[-1]["lower_bound"] - evals[0]["lower_bound"]
    return summary


def run_infill(cfg, train_cfg_fields: dict) -> dict:
    """Train the conditional head on synthetic problems; returns the summary."""
    from llmsample.ctl.trainer import CTLConfig, train_ctl

    model, tok = llmsample.load_model(cfg.model)
    out = Path(cfg.out_dir)
    train = infill_problems(
        model, tok, cfg.num_problems, cfg.suffix_tokens, cfg.seed, False, out / "problems.json"
    )
    held = infill_problems(
        model, tok, cfg.eval_problems, cfg.suffix_tokens, cfg.seed + 1, True, None
    )
    T, eos = train["T"], line_end_ids(tok)
    H = model.config.hidden_size
    if cfg.tied_head:
        head = TwistHead.tied(model, width=cfg.head_width, cond_size=H)
    else:
        head = TwistHead(H, vocab_size(model), width=cfg.head_width, cond_size=H)
    cond = text_features(model, tok, train["suffixes"])
    potentials = [SuffixLikelihood(model, tok, s) for s in train["suffixes"]]
    train_cfg = CTLConfig(**train_cfg_fields | dict(max_new_tokens=T))

    evaluate = _evaluator(cfg, model, tok, held, T, eos)
    result = train_ctl(
        model,
        tok,
        train["prompts"],
        potentials,
        head,
        train_cfg,
        eos_token_ids=eos,
        evaluate=evaluate,
        conditions=cond,
        references=train["references"],
        run_config=cfg,
    )
    return _summary(out / "metrics.jsonl", result, len(train["prompts"]), T)
