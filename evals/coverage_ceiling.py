"""How much of the soft-coverage target's mass covers every concept, from base-model draws.

The CommonGen GFlowNet trains toward sigma(x | c) ∝ p_base(x | c) exp(beta (coverage - 1)).
Base draws x ~ p_base reweighted by w = exp(beta (coverage - 1)) estimate the share of
sigma's mass on replies that cover every concept (pooled over the dev sets): the ceiling a
perfect sampler of that target reaches on the coverage metric.

    python -m evals.coverage_ceiling \\
        "evals/artifacts/results/commongen/cells/ancestral[T=1.0]-seed0.jsonl"
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence

__all__ = ["covering_share", "main"]


def covering_share(coverages: Sequence[float], beta: float) -> float:
    """Self-normalized E_sigma[coverage == 1] from draws of p_base with their coverage."""
    if not coverages:
        raise ValueError("no draws: pass a cells file with at least one sample")
    w = [math.exp(beta * (c - 1.0)) for c in coverages]
    return sum(wi for wi, c in zip(w, coverages) if c >= 1.0) / sum(w)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cells", help="a CommonGen cells JSONL of base-model draws (with 'coverage')")
    ap.add_argument("--betas", type=float, nargs="+", default=[4.0, 8.0, 16.0, 32.0])
    args = ap.parse_args(argv)
    from evals.paths import refuse_old

    refuse_old(args.cells, "cells")
    with open(args.cells) as f:
        covs = [c for line in f for c in json.loads(line)["coverage"]]
    plain = sum(c >= 1.0 for c in covs) / len(covs)
    print(f"{len(covs)} base draws, {100 * plain:.1f}% cover every concept")
    for beta in args.betas:
        share = covering_share(covs, beta)
        print(f"beta = {beta:g}: {100 * share:.1f}% of sigma's mass covers every concept")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
