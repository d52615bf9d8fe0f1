"""Aggregate finished cells into a summary, a markdown table and a Pareto plot.

    python -m evals.report evals/results/keywords      # re-render from the cells

Per (method, knob): quality against the references (sentence BLEU with effective
order and ROUGE-L, means with a 95% bootstrap CI over prompts x seeds; corpus BLEU
with its sacrebleu signature), diversity among each prompt's samples (per prompt,
then averaged; then averaged over seeds), the constraint rate where the task has a
hard constraint, log Z and ESS where the method estimates them, and compute
(forward tokens and wall time per prompt). ``summary.json`` also keeps one row per
(method, knob, seed).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from llmsample.metrics import bleu, bootstrap_ci, diversity_report, rouge

__all__ = ["load_cells", "summarize", "write_report", "pareto_front"]


def load_cells(out: Path) -> list[dict]:
    rows = []
    for path in sorted((out / "cells").glob("*.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows


def _mean(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.fmean(xs) if xs else None


def _seed_row(prompts: list[dict]) -> dict:
    """Metrics of one (method, knob, seed) cell."""
    hyps = [s for p in prompts for s in p["samples"]]
    refs = [p["references"] for p in prompts for _ in p["samples"]]
    b, r = bleu(hyps, refs), rouge(hyps, refs)
    n = len(prompts[0]["samples"])
    per_prompt_bleu = [
        statistics.fmean(b["sentence_scores"][i * n : (i + 1) * n]) for i in range(len(prompts))
    ]
    per_prompt_rouge = [
        statistics.fmean(r["per_hypothesis"]["rougeL"][i * n : (i + 1) * n])
        for i in range(len(prompts))
    ]
    div = diversity_report([p["samples"] for p in prompts])
    div.pop("per_prompt")
    sat = [s for p in prompts if p["satisfied"] is not None for s in p["satisfied"]]
    log_z = [p["log_z"] for p in prompts if p["log_z"] is not None]
    return dict(
        corpus_bleu=b["score"],
        bleu_signature=b["signature"],
        sentence_bleu=statistics.fmean(b["sentence_scores"]),
        rougeL=100 * r["rougeL"],
        per_prompt_bleu=per_prompt_bleu,
        per_prompt_rougeL=[100 * x for x in per_prompt_rouge],
        constraint_rate=statistics.fmean(sat) if sat else None,
        failed_prompts=sum(p["failed"] for p in prompts),
        log_z=log_z or None,
        ess_final=_mean(p["ess_final"] / p["particles"] for p in prompts),
        resampled_frac=_mean(p["resampled_frac"] for p in prompts),
        forward_tokens=_mean(p["forward_tokens"] for p in prompts),
        seconds=_mean(p["seconds"] for p in prompts),
        **div,
    )


def summarize(rows: list[dict]) -> dict:
    cells = defaultdict(lambda: defaultdict(list))
    for row in rows:
        cells[(row["method"], row["knob"])][row["seed"]].append(row)
    per_seed, table = [], []
    for (method, knob), seeds in cells.items():
        seed_rows = {}
        for seed, prompts in sorted(seeds.items()):
            prompts.sort(key=lambda p: p["prompt_id"])
            seed_rows[seed] = _seed_row(prompts)
            per_seed.append(
                dict(
                    method=method,
                    knob=knob,
                    seed=seed,
                    **{k: v for k, v in seed_rows[seed].items() if not k.startswith("per_prompt")},
                )
            )
        table.append(_aggregate(method, knob, list(seed_rows.values())))
    return dict(rows=table, per_seed=per_seed)


def _aggregate(method: str, knob: str, seed_rows: list[dict]) -> dict:
    pooled = lambda key: [x for s in seed_rows for x in s[key]]  # noqa: E731
    out = dict(method=method, knob=knob, seeds=len(seed_rows))
    for key in ("sentence_bleu", "rougeL"):
        values = pooled(f"per_prompt_{'bleu' if key == 'sentence_bleu' else 'rougeL'}")
        out[key] = statistics.fmean(values)
        out[f"{key}_ci"] = bootstrap_ci(values)
    skip = {
        "bleu_signature",
        "per_prompt_bleu",
        "per_prompt_rougeL",
        "log_z",
        "sentence_bleu",
        "rougeL",
    }
    for key in seed_rows[0]:
        if key not in skip:
            out[key] = _mean(s[key] for s in seed_rows)
    out["bleu_signature"] = seed_rows[0]["bleu_signature"]
    if seed_rows[0]["log_z"] is not None:  # per prompt: mean and spread over seeds
        by_prompt = list(zip(*[s["log_z"] for s in seed_rows]))
        finite = [[z for z in zs if math.isfinite(z)] for zs in by_prompt]
        out["log_z_mean"] = _mean(statistics.fmean(z) for z in finite if z)
        out["log_z_std"] = _mean(statistics.pstdev(z) for z in finite if len(z) > 1)
        out["log_z_dead"] = sum(len(zs) - len(z) for zs, z in zip(by_prompt, finite))
    return out


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated in (x, y), both maximized."""
    return [
        i
        for i, (x, y) in enumerate(points)
        if not any(x2 >= x and y2 >= y and (x2, y2) != (x, y) for x2, y2 in points)
    ]


def _fmt(v, digits=2):
    if v is None:
        return "–"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return f"{v:.{digits}f}"


def markdown(summary: dict, meta: dict) -> str:
    rows = summary["rows"]
    pts = [(100 - r["self_bleu"], r["rougeL"]) for r in rows]
    front = set(pareto_front(pts))
    lines = [
        f"# {meta['task']}: quality vs diversity vs posterior accuracy",
        "",
        f"Command: `{meta['command']}`  ",
        f"Model: `{meta['model']}`; {meta['num_prompts']} prompts x seeds {meta['seeds']}; "
        f"{meta['samples_per_prompt']} samples per prompt per cell (posterior draws by weight "
        "for weighted methods). Quality: mean over prompts x seeds with a 95% bootstrap CI. "
        "Diversity: per prompt, averaged. `*` marks the Pareto front of ROUGE-L vs "
        "(100 - self-BLEU).",
        "",
        "| method | knob | ROUGE-L (95% CI) | sentence BLEU (95% CI) | corpus BLEU | self-BLEU "
        "| distinct-2 | entropy-2 | unique | constraint rate | log Z (std over seeds) "
        "| final ESS/N | fwd tokens/prompt | s/prompt |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rows):
        lz = (
            "–"
            if r.get("log_z_mean") is None
            else f"{r['log_z_mean']:.2f} ({_fmt(r.get('log_z_std'))})"
        )
        lo, hi = r["rougeL_ci"]
        blo, bhi = r["sentence_bleu_ci"]
        lines.append(
            f"| {r['method']}{' *' if i in front else ''} | {r['knob']} "
            f"| {r['rougeL']:.1f} ({lo:.1f}–{hi:.1f}) "
            f"| {r['sentence_bleu']:.1f} ({blo:.1f}–{bhi:.1f}) "
            f"| {r['corpus_bleu']:.1f} | {_fmt(r['self_bleu'], 1)} | {_fmt(r['distinct_2'])} "
            f"| {_fmt(r['entropy_2'])} | {_fmt(r['unique_ratio'])} | {_fmt(r['constraint_rate'])} "
            f"| {lz} | {_fmt(r['ess_final'])} | {r['forward_tokens']:.0f} | {r['seconds']:.2f} |"
        )
    lines += ["", f"BLEU signature: `{rows[0]['bleu_signature']}`", ""]
    return "\n".join(lines)


def plot(summary: dict, meta: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    pts = [(100 - r["self_bleu"], r["rougeL"]) for r in rows]
    front = sorted(pareto_front(pts), key=lambda i: pts[i][0])
    fig, ax = plt.subplots(figsize=(7, 5))
    for r, (x, y) in zip(rows, pts):
        ax.scatter(x, y, s=30)
        ax.annotate(
            f"{r['method']} {r['knob']}",
            (x, y),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax.plot(
        [pts[i][0] for i in front], [pts[i][1] for i in front], "k--", lw=1, label="Pareto front"
    )
    ax.set_xlabel("diversity: 100 - self-BLEU (higher is more diverse)")
    ax.set_ylabel("quality: ROUGE-L vs references")
    ax.set_title(f"{meta['task']} ({meta['model']})")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out: Path, meta: dict) -> dict:
    summary = summarize(load_cells(out))
    summary["meta"] = meta
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "results.md").write_text(markdown(summary, meta))
    plot(summary, meta, out / "quality_vs_diversity.png")
    return summary


if __name__ == "__main__":
    target = Path(sys.argv[1])
    previous = json.loads((target / "summary.json").read_text())["meta"]
    write_report(target, previous)
