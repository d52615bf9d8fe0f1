"""How diverse are *exact* posterior draws on CommonGen? Rejection sampling says.

A base-model draw at T = 1 that uses every concept is an exact draw from
sigma(x | c) ∝ p_base(x | c) · 1[x covers c] (rejection sampling with p_base as the
proposal and the bound M = 1). So the covering draws among many base draws show the
diversity an exact sampler of the CommonGen target has: the figure a GFlowNet policy
that fits sigma should be held to (at β = 16 the soft target puts 98% of its mass on
covering replies, `evals.coverage_ceiling`).

    python -m evals.posterior_diversity --draws 64 \\
        --out evals/artifacts/results/commongen_posterior \\
        --compare "evals/artifacts/results/commongen/cells/ancestral[T=1.0]-seed0.jsonl" \\
                  "evals/artifacts/results/commongen/cells/gfn[K=16]-seed0.jsonl"

Steps:

1. The evals' 100 dev sets (seed 0). Per set, ``--draws`` base draws at T = 1 (chat
   template, 32 new tokens, as the ``ancestral`` row), ``--batch`` sets at a time,
   appended to ``<out>/draws.jsonl`` (a rerun continues after the finished sets).
2. Keep the covering draws. The sets with at least k covering draws (k = 4, the draws
   per prompt of an eval cell) form the subset S; the first k of each are k i.i.d.
   draws of sigma.
3. On S, the diversity of those draws (self-BLEU, distinct-2, unique), of the human
   references (the first k), and of each ``--compare`` cells file's draws of the same
   sets. S favours the sets the base model covers easily, so only rows on the same S
   compare.
4. Write ``<out>/results.md`` and ``<out>/results.json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from llmsample.provenance import provenance

__all__ = ["main", "subset_rows"]

K = 4  # draws per prompt in every eval cell


def _draw(args, out: Path) -> list[dict]:
    import torch
    from tqdm.auto import tqdm

    import llmsample
    from llmsample.data.tasks import build_task

    task = build_task("commongen", num_prompts=args.prompts, seed=0)
    path = out / "draws.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    if [r["prompt"] for r in rows] != [e.prompt for e in task.examples[: len(rows)]]:
        raise SystemExit(f"{path} holds draws for other prompts; delete it or use another --out")
    if len(rows) == len(task.examples):
        return rows
    torch.set_num_threads(args.threads)
    model, tok = llmsample.load_model(args.model)
    todo = range(len(rows), len(task.examples), args.batch)
    for start in tqdm(todo, desc="base draws", unit="batch"):
        ex = task.examples[start : start + args.batch]
        t0 = time.time()
        res = llmsample.ancestral_generate(
            model,
            tok,
            [e.prompt for e in ex],
            num_samples=args.draws,
            max_new_tokens=task.max_new_tokens,
            chat=True,
            seed=args.seed + start,
            progress=False,
        )
        sec = (time.time() - t0) / len(ex)
        new = [
            dict(prompt=e.prompt, words=e.words, references=e.references, samples=res.texts[b])
            for b, e in enumerate(ex)
        ]
        with path.open("a") as f:
            for r in new:
                f.write(json.dumps(r | dict(seconds=round(sec, 2))) + "\n")
        rows += new
    return rows


def subset_rows(draws: list[dict], k: int = K) -> dict[str, list[str]]:
    """Prompt -> its first k covering draws, for the prompts with at least k."""
    from llmsample.potentials.concepts import covers_all

    out = {}
    for r in draws:
        ok = [t for t in r["samples"] if covers_all(t, r["words"])]
        if len(ok) >= k:
            out[r["prompt"]] = ok[:k]
    return out


def _div(groups: list[list[str]]) -> dict:
    from llmsample.metrics.diversity import diversity_report

    d = diversity_report(groups)
    return dict(self_bleu=d["self_bleu"], distinct_2=d["distinct_2"], unique=d["unique_ratio"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for draws.jsonl and the results")
    ap.add_argument("--draws", type=int, default=64, help="base draws per concept set")
    ap.add_argument("--prompts", type=int, default=100, help="dev sets (the evals use 100)")
    ap.add_argument("--compare", nargs="*", default=[], help="eval cells files to compare")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=2, help="concept sets per generate call")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    raw = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(raw)
    if args.draws < K or args.prompts < 1 or args.batch < 1:
        raise SystemExit(f"--draws must be >= {K}, --prompts and --batch >= 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    draws = _draw(args, out)
    from llmsample.potentials.concepts import covers_all

    exact = subset_rows(draws)
    if not exact:
        raise SystemExit("no concept set has 4 covering draws; raise --draws")
    sets = sorted(exact)
    by_prompt = {r["prompt"]: r for r in draws}
    n_all = sum(len(r["samples"]) for r in draws)
    n_cov = sum(covers_all(t, r["words"]) for r in draws for t in r["samples"])
    rows = {"exact posterior (rejection)": _div([exact[p] for p in sets])}
    rows["human references"] = _div([by_prompt[p]["references"][:K] for p in sets])
    for cells in args.compare:
        with open(cells) as f:
            cell = {r["prompt"]: r["samples"][:K] for r in map(json.loads, f)}
        missing = [p for p in sets if p not in cell]
        if missing:
            raise SystemExit(f"{cells} lacks {len(missing)} of the sets (other prompts?)")
        name = f"{Path(cells).parent.parent.name}/{Path(cells).stem}"  # results folder/cell
        rows[name] = _div([cell[p] for p in sets])
    summary = dict(
        provenance=provenance("python -m evals.posterior_diversity " + shlex.join(raw)),
        draws_per_set=n_all / len(draws),
        sets=len(draws),
        sets_with_k_covering=len(sets),
        covering_draws=n_cov,
        covering_fraction=n_cov / n_all,
        rows=rows,
    )
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    lines = [
        "# CommonGen: diversity of exact posterior draws (rejection sampling)",
        "",
        f"{len(draws)} dev sets x {n_all / len(draws):g} base draws at T = 1; {n_cov} draws "
        f"({100 * n_cov / n_all:.1f}%) cover every concept; {len(sets)} sets have at least "
        f"{K}, and every row below is on those {len(sets)} sets, {K} draws each.",
        "",
        "| draws | self-BLEU | distinct-2 | unique |",
        "|---|---|---|---|",
        *(
            f"| {name} | {r['self_bleu']:.1f} | {r['distinct_2']:.2f} | {r['unique']:.2f} |"
            for name, r in rows.items()
        ),
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
