"""Posterior-quality metrics: ESS, log Z spread over seeds, and distances to exact targets.

    from llmsample.metrics import ess_summary, log_z_spread, kl_q_sigma, tv_to_target
    ess_summary(out)                       # out: a SamplingOutput
    log_z_spread(torch.stack([o.log_z for o in outs]))   # [S seeds, B prompts]
    kl_q_sigma(log_q, target)              # log_q: exact log q(x) over target.sequences
    tv_to_target(samples, log_weights, target), tv_noise_floor(target, m=len(samples))
    bound_gap(lower, upper)                # log Z_hat of SMC / conditional SMC runs [S, B]

The exact metrics take a ``llmsample.diagnostics.exact.ExactTarget`` (from ``enumerate_target``).
For KL, ``log_q[i]`` must be the sampler's exact log-probability of the complete
continuation ``target.sequences[i]`` (e.g. the proposal's summed token log-probs,
EOS included); these must sum to 1 over the M sequences.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from llmsample.smc.resampling import ess

if TYPE_CHECKING:
    from llmsample.diagnostics.exact import ExactTarget
    from llmsample.output import SamplingOutput

__all__ = [
    "ess_summary",
    "log_z_spread",
    "kl_q_sigma",
    "kl_sigma_q",
    "tv_to_target",
    "tv_noise_floor",
    "bound_gap",
]


def _avg(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else None


def ess_summary(out: SamplingOutput) -> dict:
    """ESS diagnostics of one sampling run, per prompt and averaged over prompts.

    ``final_ess``: ESS of the final normalized weights (0 if every particle was rejected);
    ``mean_ess`` / ``min_ess``: over the recorded steps (ESS after reweighting, before
    resampling; ``None`` for a run without steps); ``resample_fraction``: fraction of steps
    that resampled. ``*_frac`` keys divide by the number of particles N. Top-level
    ``final_ess``, ``mean_ess``, ``min_ess`` and ``resample_fraction`` are prompt means,
    the per-prompt lists are under ``per_prompt``.
    """
    n = out.num_particles
    final = ess(out.log_weights.double()).tolist()
    steps = out.ess.shape[1] if out.ess.ndim == 2 else 0
    if steps:
        step_ess = out.ess.double()
        mean_ess, min_ess = step_ess.mean(1).tolist(), step_ess.min(1).values.tolist()
        frac = out.resampled.double().mean(1).tolist()
    else:
        b = len(final)
        mean_ess, min_ess, frac = [None] * b, [None] * b, [0.0] * b
    per = {
        "final_ess": final,
        "mean_ess": mean_ess,
        "min_ess": min_ess,
        "resample_fraction": frac,
    }
    res: dict = {k: _avg(v) for k, v in per.items()}
    res["final_ess_frac"] = res["final_ess"] / n
    res["min_ess_frac"] = None if res["min_ess"] is None else res["min_ess"] / n
    res["num_particles"] = n
    res["num_steps"] = steps
    res["per_prompt"] = per
    return res


def log_z_spread(log_zs: Tensor | Sequence[Tensor]) -> dict:
    """Spread of log Z estimates over S seeds, per prompt ([S, B] or a list of S [B] tensors).

    Per prompt: ``mean`` and ``std`` (sample std, 0 for S = 1) of log Z_hat over seeds,
    ``log_mean_exp`` = log((1/S) sum_s Z_hat_s) (the pooled unbiased Z estimate, in log
    space) and ``num_neg_inf`` (seeds where every particle was rejected). A seed with
    log Z_hat = -inf makes ``mean`` -inf and ``std`` inf (0 if all seeds are -inf); it
    adds nothing to ``log_mean_exp``, which is -inf only if every seed is. Never NaN.
    Top-level values average the per-prompt ones (so a single -inf/inf prompt shows).
    """
    x = _runs(log_zs, "log_zs")  # [S, B]
    s = x.shape[0]
    neg = x.isneginf()
    n_neg = neg.sum(0)
    all_neg = n_neg == s
    finite_x = torch.where(neg, 0.0, x)
    mean = torch.where(n_neg > 0, -math.inf, finite_x.sum(0) / s)
    if s > 1:
        std = torch.where(n_neg > 0, math.inf, finite_x.std(0, correction=1))
    else:
        std = torch.zeros(x.shape[1], dtype=torch.float64)
    std = torch.where(all_neg, 0.0, std)
    lme = torch.logsumexp(x, dim=0) - math.log(s)  # all -inf -> -inf (torch handles it)
    lme = torch.where(all_neg, -math.inf, lme)
    per = {
        "mean": mean.tolist(),
        "std": std.tolist(),
        "log_mean_exp": lme.tolist(),
        "num_neg_inf": n_neg.tolist(),
    }
    out: dict = {k: float(torch.tensor(v, dtype=torch.float64).mean()) for k, v in per.items()}
    out["num_seeds"] = s
    out["per_prompt"] = per
    return out


def _log_q(log_q: Tensor, target: ExactTarget, atol: float) -> Tensor:
    lq = torch.as_tensor(log_q).double().flatten()
    if lq.numel() != len(target.sequences):
        raise ValueError(
            f"log_q has {lq.numel()} entries but the target has {len(target.sequences)} "
            "sequences; give log q of each target.sequences[i] in that order"
        )
    if lq.isnan().any() or lq.isposinf().any():
        raise ValueError("log_q contains NaN or +inf")
    total = float(torch.logsumexp(lq, 0).exp())
    if abs(total - 1.0) > atol:
        raise ValueError(
            f"exp(log_q) sums to {total:.6g}, not 1: q must be normalized over the target's "
            "complete continuations"
        )
    return lq


def _kl(log_a: Tensor, log_b: Tensor) -> float:
    """KL(a || b) = sum_a a (log a - log b); terms with a = 0 are 0, a > 0 = b gives inf."""
    support = ~log_a.isneginf()
    if (support & log_b.isneginf()).any():
        return math.inf
    la, lb = log_a[support], log_b[support]
    return max(0.0, float((la.exp() * (la - lb)).sum()))


def kl_q_sigma(log_q: Tensor, target: ExactTarget, atol: float = 1e-6) -> float:
    """KL(q || sigma) in nats: inf when q puts mass where sigma is 0 (never NaN).

    ``log_q[i]`` is the sampler's exact log-probability of ``target.sequences[i]``.
    """
    return _kl(_log_q(log_q, target, atol), target.log_sigma.double())


def kl_sigma_q(log_q: Tensor, target: ExactTarget, atol: float = 1e-6) -> float:
    """KL(sigma || q) in nats: inf when sigma has mass where q is 0 (never NaN)."""
    return _kl(target.log_sigma.double(), _log_q(log_q, target, atol))


def tv_to_target(
    samples: list[tuple[int, ...]], log_weights: Tensor | None, target: ExactTarget
) -> float:
    """TV between the weighted samples (complete continuations as token tuples) and sigma.

    ``log_weights=None`` weighs the samples equally. Delegates to ``ExactTarget.tv``.
    """
    return target.tv(samples, log_weights)


def tv_noise_floor(
    target: ExactTarget, m: int, q: float = 0.99, reps: int = 500, seed: int = 0
) -> float:
    """The q-quantile of TV for m exact iid draws from sigma: a TV below it is at the noise.

    Delegates to ``ExactTarget.tv_noise_floor``.
    """
    return target.tv_noise_floor(m, q=q, reps=reps, seed=seed)


def _mean_se(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean over runs and its standard error (inf for one run; -inf/inf with a -inf run)."""
    s = x.shape[0]
    neg = x.isneginf().any(0)
    finite_x = torch.where(x.isneginf(), 0.0, x)
    mean = torch.where(neg, -math.inf, finite_x.mean(0))
    if s > 1:
        se = torch.where(neg, math.inf, finite_x.std(0, correction=1) / math.sqrt(s))
    else:
        se = torch.full_like(mean, math.inf)
    return mean, se


def _runs(x: Tensor | Sequence[Tensor], what: str) -> Tensor:
    x = torch.stack(list(x)) if not isinstance(x, Tensor) else x
    x = x.double()
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"{what} must be [S runs, B prompts], got shape {tuple(x.shape)}")
    if x.isnan().any() or x.isposinf().any():
        raise ValueError(f"{what} contains NaN or +inf")
    return x


def bound_gap(lower: Tensor | Sequence[Tensor], upper: Tensor | Sequence[Tensor]) -> dict:
    """Bidirectional bounds on log Z from independent runs (:mod:`llmsample.diagnostics.bounds`).

    ``lower`` [S, B]: log Z_hat of plain SMC runs (E[log Z_hat] <= log Z); ``upper``
    [S', B]: log Z_hat of conditional SMC runs seeded with exact posterior samples
    (E[log Z_hat] >= log Z). A 1-D tensor is one prompt. Per prompt: ``lower``/``upper``
    (means over runs), ``lower_se``/``upper_se`` (standard errors: inf with one run),
    ``gap = upper - lower`` (it bounds KL(q||sigma) + KL(sigma||q) of the sampler's output
    law q, in expectation) and ``gap_se`` (the two sets of runs taken as independent). A
    lower run of -inf (every particle rejected) makes ``lower`` -inf and ``gap`` inf;
    conditional runs are never -inf, so an upper -inf raises. Top level: the means over
    prompts (standard errors of those means), and ``num_lower``/``num_upper`` runs.
    """
    lo, up = _runs(lower, "lower"), _runs(upper, "upper")
    if lo.shape[1] != up.shape[1]:
        raise ValueError(f"lower has {lo.shape[1]} prompts but upper has {up.shape[1]}")
    if up.isneginf().any():
        raise ValueError("upper contains -inf: conditional SMC runs always keep the reference")
    lo_mean, lo_se = _mean_se(lo)
    up_mean, up_se = _mean_se(up)
    gap = up_mean - lo_mean  # +inf where lower is -inf, never NaN (upper is finite)
    gap_se = torch.sqrt(lo_se**2 + up_se**2)
    per = {
        "lower": lo_mean,
        "lower_se": lo_se,
        "upper": up_mean,
        "upper_se": up_se,
        "gap": gap,
        "gap_se": gap_se,
    }
    b = lo.shape[1]
    out: dict = {
        k: float(v.mean()) if not k.endswith("_se") else float(v.pow(2).sum().sqrt() / b)
        for k, v in per.items()
    }
    out["num_lower"], out["num_upper"] = lo.shape[0], up.shape[0]
    out["per_prompt"] = {k: v.tolist() for k, v in per.items()}
    return out
