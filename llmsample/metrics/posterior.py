"""Posterior-quality metrics: ESS, log Z spread over seeds, and distances to exact targets.

    from llmsample.metrics import ess_summary, log_z_spread, kl_q_sigma, tv_to_target
    ess_summary(out)                       # out: a SamplingOutput
    log_z_spread(torch.stack([o.log_z for o in outs]))   # [S seeds, B prompts]
    kl_q_sigma(log_q, target)              # log_q: exact log q(x) over target.sequences
    tv_to_target(samples, log_weights, target), tv_noise_floor(target, m=len(samples))

The exact metrics take a ``llmsample.exact.ExactTarget`` (from ``enumerate_target``).
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

from llmsample.resampling import ess

if TYPE_CHECKING:
    from llmsample.exact import ExactTarget
    from llmsample.output import SamplingOutput

__all__ = [
    "ess_summary",
    "log_z_spread",
    "kl_q_sigma",
    "kl_sigma_q",
    "tv_to_target",
    "tv_noise_floor",
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
    x = torch.stack(list(log_zs)) if not isinstance(log_zs, Tensor) else log_zs
    x = x.double()
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"log_zs must be [S seeds, B prompts], got shape {tuple(x.shape)}")
    if x.isnan().any() or x.isposinf().any():
        raise ValueError("log_zs contain NaN or +inf")
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
