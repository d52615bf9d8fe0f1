"""Run an eval task: every (method, knob, seed) cell, resumable, then the report.

    python -m evals.run --task keywords --out evals/results/keywords
    python -m evals.run --task line-infill --out evals/results/line-infill --seeds 0 1 2
    python -m evals.run --task exact --out evals/results/exact
    python -m evals.run --task keywords --out /tmp/quick --quick   # a few prompts, small grid

Each finished cell is written to ``<out>/cells/<method>[<knob>]-seed<s>.jsonl`` (one
line per prompt: its samples and the sampler's statistics); cells already there are
skipped, so a killed run resumes where it stopped. Then ``evals.report`` writes
``summary.json``, ``results.md`` and ``quality_vs_diversity.png`` into ``<out>``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import llmsample
from evals import report
from evals.methods import draws, methods
from evals.tasks import build_task

__all__ = ["run_task", "main"]


def _cell_path(out: Path, key: str, seed: int) -> Path:
    return out / "cells" / f"{key}-seed{seed}.jsonl"


def run_task(
    task_name: str,
    out: Path,
    *,
    model_name: str = "shakespeare-tiny",
    num_prompts: int = 50,
    seeds: tuple[int, ...] = (0, 1, 2),
    samples: int = 8,
    batch: int = 10,
    quick: bool = False,
    command: str = "",
) -> dict:
    """Run (or resume) every cell of the task, then write the report; returns the summary."""
    task = build_task(task_name, num_prompts=num_prompts)
    grid = methods(task_name, quick=quick)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    todo = [(m, s) for m in grid for s in seeds if not _cell_path(out, m.key, s).exists()]
    model, tok = llmsample.load_model(model_name) if todo else (None, None)
    bar = tqdm(total=len(todo) * len(task.examples), desc=task_name, unit="prompt")
    for method, seed in todo:
        lines = []
        for start in range(0, len(task.examples), batch):
            examples = task.examples[start : start + batch]
            t0 = time.perf_counter()
            output = method.run(model, tok, task, examples, seed)
            seconds = time.perf_counter() - t0
            texts, index, failed = draws(output, samples, seed)
            for b, ex in enumerate(examples):
                lines.append(
                    _record(
                        task,
                        method,
                        seed,
                        start + b,
                        ex,
                        output,
                        b,
                        texts[b],
                        index[b],
                        failed[b],
                        seconds / len(examples),
                    )
                )
            bar.update(len(examples))
        path = _cell_path(out, method.key, seed)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(line) + "\n" for line in lines))
        os.replace(tmp, path)  # a cell is either complete on disk or absent
    bar.close()
    meta = dict(
        task=task_name,
        model=model_name,
        num_prompts=len(task.examples),
        seeds=list(seeds),
        samples_per_prompt=samples,
        quick=quick,
        command=command,
    )
    return report.write_report(out, meta)


def _record(task, method, seed, pid, ex, output, b, texts, index, failed, seconds) -> dict:
    lw = output.log_weights[b]
    sat = [task.satisfied(ex, t) for t in texts]
    return dict(
        task=task.name,
        method=method.name,
        knob=method.knob,
        seed=seed,
        prompt_id=pid,
        prompt=ex.prompt,
        references=ex.references,
        words=ex.words,
        samples=texts,
        satisfied=None if sat[0] is None else sat,
        log_potential=None
        if output.log_potential is None
        else [float(output.log_potential[b, i]) for i in index],
        failed=failed,
        log_z=None if output.log_z is None else float(output.log_z[b]),
        ess_final=float(output.ess[b, -1]),
        ess_min=float(output.ess[b].min()),
        resampled_frac=float(output.resampled[b].double().mean()),
        particles=int(lw.numel()),
        forward_tokens=output.num_forward_tokens / output.log_weights.shape[0],
        seconds=seconds,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", required=True, choices=["line-infill", "keywords", "exact"])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--model", default="shakespeare-tiny")
    p.add_argument("--prompts", type=int, default=50)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--samples", type=int, default=8, help="draws per prompt per cell")
    p.add_argument("--quick", action="store_true", help="5 prompts, 1 seed, a small grid")
    args = p.parse_args(argv)
    command = " ".join(["python -m evals.run", *(sys.argv[1:] if argv is None else argv)])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if args.task == "exact":
        from evals.exact_task import run_exact

        run_exact(args.out, seeds=tuple(args.seeds), quick=args.quick, command=command)
        return 0
    prompts, seeds = (5, (args.seeds[0],)) if args.quick else (args.prompts, tuple(args.seeds))
    summary = run_task(
        args.task,
        args.out,
        model_name=args.model,
        num_prompts=prompts,
        seeds=seeds,
        samples=args.samples,
        quick=args.quick,
        command=command,
    )
    print((args.out / "results.md").read_text())
    return 0 if summary else 1


if __name__ == "__main__":
    sys.exit(main())
