"""GFlowNet LoRA fine-tuning: a policy that samples sigma(x|c) ∝ p_base(x|c) phi(x,c).

    accelerate launch recipes/gfn_lora.py --config recipes/configs/gfn_exact.yaml
    python recipes/gfn_lora.py --config recipes/configs/gfn_exact.yaml --steps 50

Tasks (``recipes/gfn_tasks.py``): exact, uniform-number, line-infill, keywords,
commongen. Every field of :class:`GFNRecipeConfig` (the trainer's
:class:`llmsample.gfn.GFNConfig` plus the task fields) is a flag and a YAML key. The run
evaluates the base model (step 0), trains with checkpoints (rerun the same command to
resume after a kill; only the fields in ``RESUMABLE_FIELDS`` may change then,
``--overwrite`` starts afresh), evaluates again, exports the adapter to
``<out_dir>/adapter`` (load it with ``llmsample.load_model(model, adapter=...)``) and
writes ``<out_dir>/summary.json`` (each figure with the step it was measured at). SIGINT
/ SIGTERM stop it after a checkpoint with exit status 130 / 143; a config error exits
with status 2.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from gfn_tasks import TASKS, build_task  # recipes/gfn_tasks.py: the script's own folder

from llmsample.config import help_field, run_recipe
from llmsample.gfn import GFNConfig, GFNTrainer, add_lora, smc_demonstrations
from llmsample.provenance import provenance
from llmsample.train.checkpoints import check_resume, signal_stop

DEMONSTRATIONS = ("none", "references", "smc")


@dataclass
class GFNRecipeConfig(GFNConfig):
    task: str = help_field(f"one of {', '.join(TASKS)}", "exact")
    model: str = help_field(
        "base model for line-infill/keywords (embedded name, folder, hub id)", "shakespeare-tiny"
    )
    device: str = help_field("cpu | cuda", "cpu")
    num_threads: int = help_field("torch.set_num_threads (0 = torch default)", 0)
    num_prompts: int = help_field("line-infill/keywords: prompts drawn from the held-out plays", 50)
    task_seed: int = help_field("line-infill/keywords: seed of the prompt draw (evals use 0)", 0)
    eval_prompts: int = help_field("line-infill/keywords: prompts in the periodic evaluation", 8)
    eval_samples: int = help_field("line-infill/keywords: policy samples per evaluated prompt", 32)
    miss_penalty: float = help_field("keywords: log phi = -miss_penalty * (missing words)", 4.0)
    invalid_log_reward: float = help_field("uniform-number: log R of an invalid sequence", -10.0)
    coverage_beta: float = help_field("commongen: log phi = coverage_beta * (coverage - 1)", 8.0)
    demonstrations: str = help_field(
        "commongen: off-policy rows that seed the replay buffer (scored by the same reward; "
        "needs replay_fraction > 0): none | references (the training sets' human "
        "sentences) | smc (the base model's covering SMC particles, llmsample.gfn.teacher; "
        "cached in <out_dir>/teacher.jsonl)",
        "none",
    )
    teacher_particles: int = help_field("demonstrations=smc: SMC particles per prompt", 8)

    RESUMABLE_FIELDS = (*GFNConfig.RESUMABLE_FIELDS, "num_threads")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.num_threads < 0 or self.num_prompts < 1 or self.eval_prompts < 1:
            raise ValueError("num_threads must be >= 0, num_prompts and eval_prompts >= 1")
        if not self.miss_penalty > 0:
            raise ValueError("miss_penalty must be > 0")
        if not (self.coverage_beta > 0 and math.isfinite(self.coverage_beta)):
            raise ValueError(f"coverage_beta must be finite and > 0, got {self.coverage_beta}")
        if self.demonstrations not in DEMONSTRATIONS:
            raise ValueError(
                f"demonstrations must be one of {DEMONSTRATIONS}, got {self.demonstrations!r}"
            )
        if self.demonstrations != "none" and self.task != "commongen":
            raise ValueError(f"demonstrations: only the commongen task has them, not {self.task!r}")
        if self.teacher_particles < 1:
            raise ValueError(f"teacher_particles must be >= 1, got {self.teacher_particles}")


def _demonstrations(cfg: GFNRecipeConfig, task, out: Path) -> list[list[str]] | None:
    if cfg.demonstrations == "references":
        return task.demonstrations
    if cfg.demonstrations == "smc":
        return smc_demonstrations(
            task.model,
            task.tokenizer,
            task.prompts,
            task.teacher_potential,
            num_particles=cfg.teacher_particles,
            max_new_tokens=task.max_new_tokens,
            chat=task.chat,
            stop_ids=task.stop_ids,
            seed=cfg.seed,
            cache=out / "teacher.jsonl",
            progress=cfg.progress,
        )
    return None


def main(cfg: GFNRecipeConfig) -> dict:
    """Train and evaluate; returns the summary (also written to ``<out_dir>/summary.json``).
    Raises :class:`llmsample.train.checkpoints.ResumeConflict` before any work if ``out_dir``
    holds a checkpoint of a run with other settings."""
    out = Path(cfg.out_dir)
    check_resume(out, cfg)  # refuse early: the task may take a while to build
    if cfg.overwrite:  # the trainer deletes the checkpoints and metrics.jsonl
        shutil.rmtree(out / "adapter", ignore_errors=True)
        (out / "summary.json").unlink(missing_ok=True)
        (out / "teacher.jsonl").unlink(missing_ok=True)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    start = time.time()
    task = build_task(cfg)
    gfn_fields = {f.name for f in dataclasses.fields(GFNConfig)}
    train_cfg = GFNConfig(
        **{k: v for k, v in dataclasses.asdict(cfg).items() if k in gfn_fields}
        | dict(
            max_new_tokens=task.max_new_tokens,
            base_in_reward=task.base_in_reward,
            chat=task.chat,
        )
    )
    demos = _demonstrations(cfg, task, out)  # before the adapter: SMC runs on the base model
    policy = add_lora(task.model, train_cfg)
    if task.bind is not None:
        task.bind(policy)
    trainer = GFNTrainer(
        policy,
        task.tokenizer,
        task.prompts,
        task.potential,
        train_cfg,
        stop_ids=task.stop_ids,
        evaluate=task.evaluate,
        run_config=cfg,
        demonstrations=demos,
    )
    result = trainer.train()
    prov = provenance(shlex.join(["python", *sys.argv]))
    summary = dict(
        task=cfg.task,
        command=prov["command"],
        config=dataclasses.asdict(cfg),
        # final: the step reached, finished, stopped_by and the last evaluation's
        # metrics, measured at final["eval_step"] (not necessarily final["step"])
        final=result,
        stopped_by_signal=signal_stop(result["stopped_by"], result["step"]),
        wall_s=round(time.time() - start, 1),
        machine=dict(device=cfg.device, **{k: prov[k] for k in ("cpu", "torch", "threads")}),
        provenance=prov,  # the commit and command that made this file
    )
    log = out / "metrics.jsonl"
    events = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    evals = [e for e in events if e.get("event") == "eval"]
    if evals:  # each with its "step"
        summary["base"] = evals[0]
        summary["trained"] = evals[-1]
    if trainer.acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    sys.exit(run_recipe(GFNRecipeConfig, main, __doc__))
