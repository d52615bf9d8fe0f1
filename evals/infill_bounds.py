"""Bounds on log Z for line infilling: which sampler closes the gap, at what cost.

    python -m evals.infill_bounds --out evals/artifacts/results/line-infill-bounds
    python -m evals.infill_bounds --out /tmp/quick --quick        # 4 problems, N = 4

**Problems.** The real middle line of a play is not an exact posterior sample (the
plays did not come from the model), so conditional SMC seeded with it bounds nothing.
Synthetic problems do come with one (Zhao et al. 2024): for the context c of each
line-infill eval prompt (held-out plays), draw the middle line x ~ p(x | c) and the next
``suffix_tokens`` tokens s ~ p(s | c, x) from the model
(:func:`llmsample.diagnostics.bounds.joint_infill_samples`); x is then an exact draw from
sigma(x | c, s) ∝ p(x | c) p(s | c, x). Over problems, the mean of SMC's log Z_hat is a
lower bound on the mean log Z(c, s), and the mean of conditional SMC's (seeded with x) an
upper bound; their gap bounds the sampler's symmetric KL to sigma
(``llmsample.diagnostics.bounds``).

**Methods** (the evals' names; resampling multinomial when ESS < N/2):

- ``smc``: the base model as proposal, no twist.
- ``smc-twist``: the suffix likelihood of the prefix as the twist (the evals' heuristic).
- ``smc-learned``: the CTL twist head of ``evals/artifacts/twists/line-infill`` (trained by
  ``recipes/configs/twist_ctl_line_infill.yaml`` on synthetic problems from the training
  plays), reading the suffix through ``text_features``; base proposal.
- ``smc-learned-q``: the same twist with its locally optimal proposal q ∝ p·psi (the
  last token, where every token completes a line, from p).
- ``gfn-is``: the GFlowNet LoRA policy of ``evals/artifacts/adapters/line-infill`` as the proposal
  of importance sampling (no resampling).
- ``gfn-flow``: the same policy as the SMC proposal with its implied flow as the twist
  (:class:`llmsample.gfn.FlowTwist`).

Each (method, N) cell runs ``--seeds`` lower and upper runs over every problem, and is
saved to ``<out>/cells/<method>-N<n>.json`` (a rerun skips finished cells). Compute is
the wall time per problem per run on this machine (every cell runs in one process on the
same CPU threads), and the model forward tokens the run reports.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

import llmsample
from evals.paths import ADAPTERS, TWISTS, refuse_old
from evals.report import commit_line
from llmsample.ctl.head import LearnedTwist, TwistHead, text_features
from llmsample.diagnostics.bounds import joint_infill_samples
from llmsample.generate import smc_generate
from llmsample.gfn import FlowTwist
from llmsample.hf.prompts import line_end_ids
from llmsample.potentials import SuffixLikelihood
from llmsample.provenance import provenance

__all__ = ["run_bounds", "main", "METHODS", "TWISTS"]

METHODS = ("smc", "smc-twist", "smc-learned", "smc-learned-q", "gfn-is", "gfn-flow")


def _problems(model, tok, num: int, suffix_tokens: int, seed: int):
    from llmsample.data.tasks import build_task

    task = build_task("line-infill", num_prompts=num, seed=0)
    prompts = [e.prompt for e in task.examples]
    joint = joint_infill_samples(model, tok, prompts, task.max_new_tokens, suffix_tokens, seed)
    return joint, task.max_new_tokens


def _setup(name: str, model, tok, joint, policy):
    """(smc_generate keywords) of a method on the problems."""
    if name == "smc":
        return dict(potential=SuffixLikelihood(model, tok, joint.suffixes))
    if name == "smc-twist":
        return dict(
            potential=SuffixLikelihood(model, tok, joint.suffixes, as_twist=True), twist="prefix"
        )
    potential = SuffixLikelihood(model, tok, joint.suffixes)
    if name in ("smc-learned", "smc-learned-q"):
        head = TwistHead.load(TWISTS / "line-infill" / "twist_head.pt").eval()
        cond = text_features(model, tok, joint.suffixes)
        twist = LearnedTwist(model, head, condition=cond, exact_last_step=False)
        if name == "smc-learned":
            return dict(potential=potential, twist=twist)
        return dict(potential=potential, twist=twist, proposal="optimal")
    if name == "gfn-is":
        return dict(potential=potential, proposal=policy, ess_threshold=0.0)
    if name == "gfn-flow":
        newline = tok("\n", add_special_tokens=False)["input_ids"]
        flow = FlowTwist(policy, model, stop_token_id=newline[-1])
        return dict(potential=potential, proposal=policy, twist=flow)
    raise ValueError(f"unknown method {name!r}; choose from {METHODS}")


def _cell(model, tok, joint, T, name, n, seeds, policy) -> dict:
    kw = _setup(name, model, tok, joint, policy)
    kw.setdefault("resampling", "multinomial")  # the conditional runs' scheme
    eos = line_end_ids(tok)
    lower, upper, tokens, seconds = [], [], 0, 0.0
    for s in seeds:
        for ref, out in ((None, lower), (joint.references, upper)):
            t0 = time.perf_counter()
            run = smc_generate(
                model,
                tok,
                joint.prompts,
                num_particles=n,
                max_new_tokens=T,
                eos_token_id=eos,
                seed=s,
                reference=ref,
                **kw,
            )
            seconds += time.perf_counter() - t0
            tokens += run.num_forward_tokens
            out.append(run.log_z.double())
    lo, up = torch.stack(lower).mean(0), torch.stack(upper).mean(0)  # [problems]
    # each problem has its own exact reference, so the bounds hold on the mean over
    # problems: the standard error is over problems
    per = up - lo
    runs = 2 * len(seeds) * len(joint.prompts)
    return dict(
        method=name,
        N=n,
        seeds=len(seeds),
        problems=len(joint.prompts),
        lower=float(lo.mean()),
        upper=float(up.mean()),
        gap=float(per.mean()),
        gap_se=float(per.std() / len(per) ** 0.5),
        s_per_problem_run=seconds / runs,
        fwd_tokens_per_problem_run=tokens / runs,
    )


def run_bounds(
    out: Path,
    *,
    problems: int = 32,
    suffix_tokens: int = 12,
    sizes: tuple[int, ...] = (4, 16, 64),
    seeds: tuple[int, ...] = (0, 1, 2, 3),
    methods: tuple[str, ...] = METHODS,
    command: str = "",
) -> dict:
    """Run (or resume) every (method, N) cell; write summary.json and results.md."""
    for path in (out / "cells").glob("*.json"):  # cells of earlier runs must match
        r = json.loads(path.read_text())
        if (r["problems"], r["seeds"], r["suffix_tokens"]) != (
            problems,
            len(seeds),
            suffix_tokens,
        ):
            raise ValueError(
                f"cell {path.name} in {out} was run with other settings ({r['problems']} "
                f"problems, {r['seeds']} seeds, {r['suffix_tokens']} suffix tokens); use "
                "another --out"
            )
    model, tok = llmsample.load_model("shakespeare-tiny")
    joint, T = _problems(model, tok, problems, suffix_tokens, seed=12345)
    policy = None
    if any(m.startswith("gfn") for m in methods):
        policy, _ = llmsample.load_model("shakespeare-tiny", adapter=str(ADAPTERS / "line-infill"))
    (out / "cells").mkdir(parents=True, exist_ok=True)
    for name in methods:
        for n in sizes:
            path = out / "cells" / f"{name}-N{n}.json"
            if not path.exists():
                row = _cell(model, tok, joint, T, name, n, seeds, policy)
                row |= dict(command=command, suffix_tokens=suffix_tokens)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(row, indent=1))
                os.replace(tmp, path)
                print(json.dumps(row), flush=True)
    # the report covers every cell in the folder (cells of other invocations too, e.g.
    # the costly methods run at fewer N), in method order, then N
    rows = [json.loads(p.read_text()) for p in (out / "cells").glob("*.json")]
    rows.sort(key=lambda r: (METHODS.index(r["method"]), r["N"]))
    meta = dict(
        commands=sorted({r["command"] for r in rows}),
        problems=problems,
        suffix_tokens=suffix_tokens,
        seeds=list(seeds),
        max_new_tokens=T,
        torch_threads=torch.get_num_threads(),
        provenance=provenance(command),
    )
    summary = dict(meta=meta, rows=rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "results.md").write_text(render(summary))
    return summary


def render(summary: dict) -> str:
    meta = summary["meta"]
    base = {r["N"]: r["gap"] for r in summary["rows"] if r["method"] == "smc"}
    lines = [
        "# line-infill: bounds on log Z",
        "",
        "Commands: " + ", ".join(f"`{c}`" for c in meta["commands"]) + "  ",
        commit_line(meta),
        f"{meta['problems']} synthetic problems (contexts of the line-infill eval prompts, "
        f"middle line and {meta['suffix_tokens']} suffix tokens drawn from the model), "
        f"{len(meta['seeds'])} lower and {len(meta['seeds'])} upper runs per problem per cell. "
        "lower/upper: means over problems and runs of log Z_hat of SMC and of conditional "
        "SMC seeded with the exact middle line; gap = upper - lower (± its standard error "
        "over problems); `vs smc`: the gap of untwisted SMC at the same N divided by this "
        "one (above 2 meets the issue's bar). Compute: wall seconds and model forward "
        f"tokens per problem per run ({meta['torch_threads']} CPU threads).",
        "",
        "| method | N | lower | upper | gap ± se | vs smc | s/problem | fwd tokens/problem |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        ratio = base.get(r["N"], float("nan")) / r["gap"] if r["gap"] > 0 else float("inf")
        lines.append(
            f"| {r['method']} | {r['N']} | {r['lower']:.2f} | {r['upper']:.2f} "
            f"| {r['gap']:.2f} ± {r['gap_se']:.2f} | {ratio:.2f} | {r['s_per_problem_run']:.3f} "
            f"| {r['fwd_tokens_per_problem_run']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--problems", type=int, default=32)
    p.add_argument("--suffix-tokens", type=int, default=12)
    p.add_argument("--sizes", type=int, nargs="+", default=[4, 16, 64])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--quick", action="store_true", help="4 problems, N = 4, 1 seed")
    args = p.parse_args(argv)
    refuse_old(args.out, "--out")
    command = " ".join(["python -m evals.infill_bounds", *(sys.argv[1:] if argv is None else argv)])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(max(1, args.threads))
    if args.quick:
        args.problems, args.sizes, args.seeds = 4, [4], [0]
    run_bounds(
        args.out,
        problems=args.problems,
        suffix_tokens=args.suffix_tokens,
        sizes=tuple(args.sizes),
        seeds=tuple(args.seeds),
        methods=tuple(args.methods),
        command=command,
    )
    print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
