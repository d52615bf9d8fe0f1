"""Run an eval task: every (method, knob, seed) cell, resumable, then the report.

    python -m evals.run --task keywords --out evals/artifacts/results/keywords
    python -m evals.run --task line-infill --out evals/artifacts/results/line-infill --seeds 0 1 2
    python -m evals.run --task exact --out evals/artifacts/results/exact
    python -m evals.run --task commongen --out evals/artifacts/results/commongen
    python -m evals.run --task keywords --out /tmp/quick --quick   # a few prompts, small grid

Each finished cell is written to ``<out>/cells/<method>[<knob>]-seed<s>.jsonl`` (one
line per prompt: its samples and the sampler's statistics); cells already there are
skipped, so a killed run resumes where it stopped. Then ``evals.report`` writes
``summary.json``, ``results.md`` and ``quality_vs_diversity.png`` into ``<out>``.

Defaults per task: commongen runs ``smollm2-135m-instruct`` on 100 prompts, seed 0, 4
draws per prompt; the Shakespeare tasks ``shakespeare-tiny`` on 50 prompts, seeds 0-2,
8 draws. commongen records per draw also the concept coverage, whether it is one
sentence (``llmsample.data.commongen.is_one_sentence``) and its fluency: the base model's
mean log-probability per token of the draw (+ EOS) given its chat prompt, teacher
forced (``evals.methods.score_texts``; not counted in the method's time).
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
from evals.methods import draws, methods, score_texts
from evals.paths import refuse_old
from llmsample.data.tasks import build_task
from llmsample.provenance import provenance

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
    only: list[str] | None = None,
    adapter: Path | None = None,
) -> dict:
    """Run (or resume) every cell of the task, then write the report; returns the summary.

    ``only`` (method names, e.g. ``["smc", "beam"]``) runs just those methods' cells; the
    report still covers every finished cell, so several processes can share the grid."""
    task = build_task(task_name, num_prompts=num_prompts)
    grid = _select(methods(task_name, quick=quick, samples=samples, adapter=adapter), only)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    todo = [(m, s) for m in grid for s in seeds if not _cell_path(out, m.key, s).exists()]
    model, tok = llmsample.load_model(model_name) if todo else (None, None)
    bar = tqdm(total=len(todo) * len(task.examples), desc=task_name, unit="prompt")
    for method, seed in todo:
        bar.set_postfix_str(f"{method.key} seed {seed}")
        lines = []
        for start in range(0, len(task.examples), batch):
            examples = task.examples[start : start + batch]
            lines += _run_batch(model, tok, task, method, seed, samples, examples, start)
            bar.update(len(examples))
        _write_cell(_cell_path(out, method.key, seed), lines)
    bar.close()
    meta = dict(
        task=task_name,
        model=model_name,
        num_prompts=len(task.examples),
        seeds=list(seeds),
        samples_per_prompt=samples,
        quick=quick,
        command=command,
        commands=_commands(out, command),
        provenance=provenance(command),  # the commit that wrote this report
    )
    return report.write_report(out, meta)


def _select(grid: list, only: list[str] | None) -> list:
    """The grid's methods named in ``only`` (all without it); an unknown name exits."""
    if not only:
        return grid
    unknown = set(only) - {m.name for m in grid}
    if unknown:
        raise SystemExit(
            f"--methods: unknown {sorted(unknown)}; the grid has {sorted({m.name for m in grid})}"
        )
    return [m for m in grid if m.name in only]


def _run_batch(model, tok, task, method, seed: int, samples: int, examples, first: int) -> list:
    """One batch of prompts (``first`` the index of its first) through the method: a record
    per prompt, with the batch's time shared out equally."""
    t0 = time.perf_counter()
    output = method.run(model, tok, task, examples, seed)
    seconds = time.perf_counter() - t0
    texts, index, failed = draws(output, samples, seed)
    fluency = _fluency(model, tok, examples, texts) if task.chat else [None] * len(examples)
    return [
        _record(
            task,
            method,
            seed,
            first + b,
            ex,
            output,
            b,
            texts[b],
            index[b],
            failed[b],
            seconds / len(examples),
            fluency[b],
        )
        for b, ex in enumerate(examples)
    ]


def _fluency(model, tok, examples, texts: list[list[str]]) -> list[list[tuple]]:
    """Per prompt and draw: (sum log p, tokens) of the draw under the base model (chat)."""
    flat = [(ex.prompt, t) for ex, ts in zip(examples, texts) for t in ts]
    scores = score_texts(model, tok, *map(list, zip(*flat)), chat=True)
    ends = torch.tensor([len(ts) for ts in texts]).cumsum(0).tolist()
    return [scores[e - len(ts) : e] for ts, e in zip(texts, ends)]


def _write_cell(path: Path, lines: list[dict]) -> None:
    """The cell's records as JSON lines, atomically: complete on disk or absent."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    os.replace(tmp, path)


def _commands(out: Path, command: str) -> list[str]:
    """Every command that wrote cells into ``out`` (processes may share a grid with
    ``--methods``), in order, the current one last. A command without ``--methods``
    runs (or finds) every cell of the grid, so it stands alone."""
    previous = []
    if "--methods" not in command.split():
        return [command]
    summary = out / "summary.json"
    if summary.is_file():
        meta = json.loads(summary.read_text()).get("meta", {})
        previous = meta.get("commands") or [meta.get("command")]
    return [c for c in previous if c and c != command] + [command]


def _record(task, method, seed, pid, ex, output, b, texts, index, failed, seconds, fluency=None):
    lw = output.log_weights[b]
    sat = [task.satisfied(ex, t) for t in texts]
    extra = {}
    if task.name == "commongen":
        from llmsample.data.commongen import is_one_sentence
        from llmsample.potentials.concepts import coverage

        extra = dict(
            coverage=[coverage(t, ex.words) for t in texts],
            one_sentence=[is_one_sentence(t) for t in texts],
            fluency=[lp / n for lp, n in fluency],
            logp=[lp for lp, _ in fluency],
            distinct_particles=len(set(output.texts[b])),
            distinct_draws=len(set(texts)),
            particle_satisfied_frac=None
            if output.log_potential is None
            else float(torch.isfinite(output.log_potential[b]).double().mean()),
        )
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
        **extra,
    )


TASK_DEFAULTS = {
    "commongen": dict(model="smollm2-135m-instruct", prompts=100, seeds=[0], samples=4),
    "*": dict(model="shakespeare-tiny", prompts=50, seeds=[0, 1, 2], samples=8),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--task", required=True, choices=["line-infill", "keywords", "exact", "commongen"]
    )
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--model", help="default: smollm2-135m-instruct (commongen), else tiny")
    p.add_argument("--prompts", type=int, help="default: 100 (commongen), else 50")
    p.add_argument("--seeds", type=int, nargs="+", help="default: 0 (commongen), else 0 1 2")
    p.add_argument("--samples", type=int, help="draws per prompt per cell (4 commongen, else 8)")
    p.add_argument("--quick", action="store_true", help="5 prompts, 1 seed, a small grid")
    p.add_argument("--methods", nargs="+", help="run only these methods (e.g. smc beam)")
    p.add_argument(
        "--adapter",
        type=Path,
        help="GFlowNet adapter folder for the gfn rows (e.g. out/gfn_commongen/adapter); "
        "default: the committed evals/artifacts/adapters/<task>",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=max(1, min(2, os.cpu_count() or 1)),
        help="torch CPU threads (use 1 per process when running several processes)",
    )
    args = p.parse_args(argv)
    refuse_old(args.out, "--out")
    if args.adapter is not None and not (args.adapter / "adapter_config.json").is_file():
        p.error(
            f"--adapter {args.adapter}: no adapter_config.json there; pass the folder a "
            "recipe exported (<out_dir>/adapter)"
        )
    for key, value in TASK_DEFAULTS.get(args.task, TASK_DEFAULTS["*"]).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    command = " ".join(["python -m evals.run", *(sys.argv[1:] if argv is None else argv)])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
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
        only=args.methods,
        adapter=args.adapter,
    )
    print((args.out / "results.md").read_text())
    return 0 if summary else 1


if __name__ == "__main__":
    sys.exit(main())
