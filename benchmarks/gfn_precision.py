"""Seconds per GFlowNet training step at three precisions, on a recipe config's task.

    python benchmarks/gfn_precision.py --config recipes/configs/gfn_commongen.yaml \\
        --out benchmarks/results/gfn_precision_smollm2.json --markdown benchmarks/RESULTS.md
    python benchmarks/gfn_precision.py --config recipes/configs/gfn_exact.yaml --quick

The variants change two :class:`llmsample.gfn.GFNConfig` fields; every other setting is
the config's (add recipe flags after ``--``, e.g. ``-- --loss subtb --coverage_beta 16``):

* ``fp32``: ``rollout_dtype=float32``, ``mixed_precision=no`` (the defaults).
* ``bf16-rollout``: ``rollout_dtype=bfloat16``: a frozen bf16 copy of the policy with the
  LoRA merged in (``llmsample.hf.adapters.MergedCopy``, synced each step) samples the
  fresh rows; the reward and the scoring pass stay fp32.
* ``bf16-rollout+autocast``: also ``mixed_precision=bf16``: the reward and scoring passes
  and the backward run under bf16 autocast (weights, gradients and AdamW stay fp32).

Each variant runs in its own subprocess (accelerate fixes mixed precision per process),
in ABBA order over ``--rounds``. A process builds the task and the trainer (no
checkpoints or evaluations), runs ``--warmup`` untimed steps, then ``--repeats`` timed
``train_step()`` calls, then times ``sample_rollouts`` alone (the first two prompts,
``samples_per_prompt`` rows, seed 0) ``--repeats`` times with the model the step samples
with. The same seed picks the same prompts in every variant; the rows differ (a bf16
policy samples other tokens), so the table gives the mean new tokens per row too.
Reported: medians over all timed steps of a variant and the ratio to ``fp32``'s.
Nothing is written unless ``--out`` / ``--markdown`` are given.
"""

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import report  # benchmarks/report.py: the script's own folder

# the workers import the recipe's task builder (recipes/gfn_tasks.py) through PYTHONPATH
RECIPES = Path(__file__).resolve().parents[1] / "recipes"

VARIANTS = {
    "fp32": dict(rollout_dtype="float32", mixed_precision="no"),
    "bf16-rollout": dict(rollout_dtype="bfloat16", mixed_precision="no"),
    "bf16-rollout+autocast": dict(rollout_dtype="bfloat16", mixed_precision="bf16"),
}


def worker(args, recipe_flags: list[str]) -> dict:
    """One variant in this process: the step and rollout times."""
    import torch
    from gfn_lora import GFNRecipeConfig
    from gfn_tasks import build_task

    from llmsample.config import parse_config
    from llmsample.gfn import GFNConfig, GFNTrainer, add_lora, sample_rollouts
    from llmsample.hf.prompts import encode_prompts

    v = VARIANTS[args.worker]
    with tempfile.TemporaryDirectory() as tmp:
        flags = ["--config", args.config, *recipe_flags, "--out_dir", tmp, "--overwrite", "true"]
        flags += ["--save_every", "0", "--eval_every", "0", "--progress", "false"]
        flags += ["--rollout_dtype", v["rollout_dtype"], "--mixed_precision", v["mixed_precision"]]
        cfg = parse_config(GFNRecipeConfig, flags)
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        task = build_task(cfg)
        fields = {f.name for f in dataclasses.fields(GFNConfig)}
        task_fields = dict(
            max_new_tokens=task.max_new_tokens, base_in_reward=task.base_in_reward, chat=task.chat
        )
        tcfg = GFNConfig(
            **{k: x for k, x in dataclasses.asdict(cfg).items() if k in fields} | task_fields
        )
        policy = add_lora(task.model, tcfg)
        if task.bind is not None:
            task.bind(policy)
        trainer = GFNTrainer(
            policy, task.tokenizer, task.prompts, task.potential, tcfg, stop_ids=task.stop_ids
        )
        for _ in range(args.warmup):
            trainer.train_step()
        steps, tokens = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            trainer.train_step()
            steps.append(time.perf_counter() - t0)
        prompts = encode_prompts(task.tokenizer, task.prompts[:2], chat=task.chat)
        sampler = trainer.rollout.model if trainer.rollout is not None else policy
        rollouts = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            ro = sample_rollouts(
                sampler,
                prompts,
                tcfg.samples_per_prompt,
                tcfg.max_new_tokens,
                task.stop_ids,
                generator=torch.Generator().manual_seed(0),
            )
            rollouts.append(time.perf_counter() - t0)
            tokens.append(float(ro.lengths.float().mean()))
        sampler_dtype = str(next(sampler.parameters()).dtype).removeprefix("torch.")
        mixed = str(trainer.acc.mixed_precision)
    return dict(
        variant=args.worker,
        sampler_dtype=sampler_dtype,  # what the variant claims to change, as run
        mixed_precision=mixed,
        step_s=steps,
        rollout_s=rollouts,
        tokens=tokens,
    )


def run(args, recipe_flags: list[str]) -> dict:
    """Every variant in fresh subprocesses, ABBA over the rounds; medians and ratios."""
    names = list(VARIANTS)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    path = os.pathsep.join(filter(None, [str(RECIPES), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=path)
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            cmd = [sys.executable, __file__, "--config", args.config, "--worker", name]
            cmd += ["--warmup", str(args.warmup), "--repeats", str(args.repeats), "--"]
            print(f"round {r + 1}/{args.rounds}: {name}", file=sys.stderr, flush=True)
            out = subprocess.run(cmd + recipe_flags, capture_output=True, text=True, env=env)
            if out.returncode != 0:
                raise SystemExit(f"worker {name} failed:\n{out.stderr[-3000:]}")
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = {}
    for name in names:
        step = statistics.median(s for w in runs[name] for s in w["step_s"])
        roll = statistics.median(s for w in runs[name] for s in w["rollout_s"])
        toks = statistics.mean(t for w in runs[name] for t in w["tokens"])
        rows[name] = dict(step_s=step, rollout_s=roll, tokens_per_row=toks, runs=runs[name])
    for row in rows.values():
        row["step_speedup"] = rows["fp32"]["step_s"] / row["step_s"]
        row["rollout_speedup"] = rows["fp32"]["rollout_s"] / row["rollout_s"]
    return rows


def table(rows: dict, info: dict, command: str) -> list[str]:
    flags = " ".join(info["recipe_flags"]) or "none"
    lines = [
        f"### gfn_precision ({info['device']}, {Path(info['config']).stem})",
        "",
        f"`{command}`",
        "",
        f"One `GFNTrainer.train_step()` of `{info['config']}` (extra recipe flags: {flags}) "
        "and one `sample_rollouts` call of the first two prompts, per variant: fp32 (the "
        "default), bf16-rollout (`rollout_dtype=bfloat16`: a merged bf16 copy samples), "
        "bf16-rollout+autocast (plus `mixed_precision=bf16`). Medians; speed-ups are "
        "fp32's time over the variant's, in the same run.",
        "",
        "| variant | step s (median) | step speed-up | rollout s (median) | rollout speed-up "
        "| new tokens per row |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['step_s']:.2f} | {r['step_speedup']:.2f}x | {r['rollout_s']:.2f} "
            f"| {r['rollout_speedup']:.2f}x | {r['tokens_per_row']:.1f} |"
        )
    n = len(rows["fp32"]["runs"]) * len(rows["fp32"]["runs"][0]["step_s"])
    load = f"{info['loadavg_start'][0]:.2f} -> {info['loadavg_end'][0]:.2f}"
    lines += [
        "",
        f"{n} timed steps per variant; {info['cpu']}, {info['cpu_count']} CPUs "
        f"({info['torch_threads']} torch threads), torch {info['torch']}; load average {load}.",
    ]
    return lines


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    recipe_flags = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="a recipes/configs/gfn_*.yaml file")
    p.add_argument("--rounds", type=int, default=2, help="ABBA rounds (processes per variant)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per process")
    p.add_argument("--repeats", type=int, default=4, help="timed steps per process")
    p.add_argument("--quick", action="store_true", help="one round, 2 steps: a smoke test")
    p.add_argument("--out", default=None, help="write the JSON here")
    p.add_argument("--markdown", default=None, help="replace this benchmark's section here")
    p.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not Path(args.config).is_file():
        p.error(f"--config {args.config}: no such file")
    if args.quick:
        args.rounds, args.warmup, args.repeats = 1, 1, 2
    if args.worker:
        print(json.dumps(worker(args, recipe_flags)))
        return
    info = report.machine_info() | dict(config=args.config, recipe_flags=recipe_flags)
    rows = run(args, recipe_flags)
    info["loadavg_end"] = list(os.getloadavg())
    command = " ".join(["python benchmarks/gfn_precision.py", *sys.argv[1:]])
    lines = table(rows, info, command)
    print("\n".join(lines))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(dict(machine=info, rows=rows), indent=2))
    if args.markdown:
        key = f"gfn_precision:{info['device']}:{Path(args.config).stem}"
        report.write_section(args.markdown, key, lines)


if __name__ == "__main__":
    main()
