"""Resampling schemes for sequential Monte Carlo over a batch of particle systems.

Given unnormalized log weights ``log_w`` of shape [B, N] (B independent particle systems of
N particles each), a scheme returns ancestor indices [B, N]: after resampling, particle j of
row b is a copy of particle ``ancestors[b, j]``. The number of times i appears in a row is its
offspring count; every scheme here is unbiased (expected count N * w_i) and they differ only
in variance:

    multinomial  N iid draws from w. Simplest, highest variance.
    stratified   one uniform in each stratum [j/N, (j+1)/N), drawn independently.
    systematic   one uniform shared by all strata, u_j = (j + U) / N. Lowest variance in
                 practice and the usual default.
    residual     floor(N w_i) deterministic copies of each particle, the remaining
                 R = N - sum_i floor(N w_i) drawn multinomially from the residuals.

Conventions:
    - weights are normalized in float64 before the CDF is built and inverted.
    - a particle whose weight is -inf (or underflows to 0 once normalized) is never chosen.
    - a row whose log weights are all -inf returns the identity arange(N); what a dead row
      means is the caller's decision.
    - all randomness comes from ``generator`` (which must live on log_w's device), so the same
      seed gives the same ancestors.
    - ancestors come back sorted ascending within each row (good for KV cache locality).
    - NaN or +inf log weights raise ValueError instead of silently producing garbage.

Example:
    >>> log_w = torch.tensor([[0.0, 0.0, float("-inf"), 0.0]])
    >>> ess(log_w)
    tensor([3.])
    >>> anc = resample(log_w, "systematic", generator=torch.Generator().manual_seed(0))
    >>> anc.shape, bool((anc != 2).all())
    (torch.Size([1, 4]), True)
"""

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "SCHEMES",
    "ess",
    "log_normalize",
    "multinomial",
    "resample",
    "residual",
    "stratified",
    "systematic",
]


def log_normalize(log_w: Tensor) -> Tensor:
    """Normalize log weights over the last dim: log_w - logsumexp(log_w).

    The row max is subtracted first, so huge magnitudes (e.g. +-1e30) don't swallow the
    normalizer (log_normalize([1e30, 1e30]) = [-log 2, -log 2]), and a row of all -inf stays
    all -inf (never NaN). +inf is not a valid log weight and gives NaN here (the resampling
    schemes reject it).
    """
    m = log_w.amax(dim=-1, keepdim=True)
    x = log_w - torch.where(m == -math.inf, 0.0, m)  # row max is now exactly 0
    lse = torch.logsumexp(x, dim=-1, keepdim=True)  # in [0, log N] for a live row
    return x - lse.clamp(min=0.0)  # clamp maps a dead row's -inf to 0, leaving -inf entries


def ess(log_w: Tensor) -> Tensor:
    """Effective sample size (sum w)^2 / sum w^2 over the last dim, computed in log space.

    Returns shape log_w.shape[:-1] in log_w's dtype: a value in [1, N] for a row with a finite
    entry, 0 for a row of all -inf.
    """
    ln = log_normalize(log_w.double())
    out = torch.exp(-torch.logsumexp(2.0 * ln, dim=-1))  # sum w = 1 after normalizing
    dead = (log_w == -math.inf).all(dim=-1)
    return torch.where(dead, 0.0, out).to(log_w.dtype)


# ----------------------------------------------------------------------------- helpers


def _weights(log_w: Tensor) -> Tensor:
    """Validate log_w and return its normalized weights [B, N] in float64."""
    if not isinstance(log_w, Tensor):
        raise TypeError(f"log_w must be a torch.Tensor, got {type(log_w).__name__}")
    if log_w.ndim != 2 or log_w.shape[1] < 1 or not log_w.is_floating_point():
        raise ValueError(
            "log_w must be a 2-D floating tensor [B, N] with N >= 1, "
            f"got shape {tuple(log_w.shape)} and dtype {log_w.dtype}"
        )
    has_nan, has_pos_inf = torch.stack([log_w.isnan().any(), log_w.isposinf().any()]).tolist()
    if has_nan:
        raise ValueError("log weights contain NaN; refusing to resample")
    if has_pos_inf:
        raise ValueError("log weights contain +inf; refusing to resample")
    return log_normalize(log_w.double()).exp()


def _uniform(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.rand(shape, generator=generator, device=like.device, dtype=torch.float64)


def _invert_cdf(w: Tensor, u: Tensor) -> Tensor:
    """Inverse-CDF lookup: for w [B, N] >= 0 (any scale) and u [B, N] in [0, 1], return the i
    with cdf[i-1] <= u * total < cdf[i].

    A zero-weight particle repeats the previous cdf value, so the right-sided search (first i
    with cdf[i] > u) never lands on it. Rounding can leave u * total at or above the cdf of the
    last positive particle; such draws land past it and are clamped back onto it, never onto
    a trailing zero-weight particle. Rows without any positive weight return arange(N).
    """
    cdf = w.cumsum(dim=-1)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1:]).contiguous(), right=True)
    ar = torch.arange(w.shape[1], device=w.device)
    last = torch.where(w > 0, ar, -1).amax(dim=-1, keepdim=True)  # last positive particle
    idx = torch.minimum(idx, last)
    return torch.where(last < 0, ar, idx)


# ----------------------------------------------------------------------------- schemes


def multinomial(log_w: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """N iid draws from the normalized weights (sorted ascending)."""
    w = _weights(log_w)
    u = _uniform(w.shape, w, generator).sort(dim=-1).values
    return _invert_cdf(w, u)


def stratified(log_w: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One independent uniform per stratum: u_j = (j + U_j) / N."""
    w = _weights(log_w)
    n = w.shape[1]
    u = torch.arange(n, device=w.device, dtype=torch.float64) + _uniform(w.shape, w, generator)
    return _invert_cdf(w, u / n)


def systematic(log_w: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One uniform per row shared by all strata: u_j = (j + U) / N."""
    w = _weights(log_w)
    b, n = w.shape
    u = torch.arange(n, device=w.device, dtype=torch.float64) + _uniform((b, 1), w, generator)
    return _invert_cdf(w, u / n)


def residual(log_w: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """floor(N w_i) copies of each particle, then R = N - sum floor(N w_i) multinomial draws
    from the residual weights N w_i - floor(N w_i). R may be 0 (e.g. all N w_i integral)."""
    w = _weights(log_w)
    b, n = w.shape
    nw = n * w
    counts = nw.floor()
    rest = nw - counts  # exact in floating point; 0 for -inf particles
    r = n - counts.sum(dim=-1, keepdim=True)  # [B, 1] residual draws per row, an integer
    draws = _invert_cdf(rest, _uniform((b, n), w, generator))  # iid; use the first r of each row
    used = torch.arange(n, device=w.device) < r
    counts = counts.long().scatter_add(1, draws, used.long())  # each row now sums to n
    ancestors = torch.arange(n, device=w.device).repeat(b)
    return ancestors.repeat_interleave(counts.view(-1), output_size=b * n).view(b, n)


SCHEMES: dict[str, Callable[..., Tensor]] = {
    "multinomial": multinomial,
    "stratified": stratified,
    "systematic": systematic,
    "residual": residual,
}


def resample(
    log_w: Tensor, scheme: str = "systematic", generator: torch.Generator | None = None
) -> Tensor:
    """Ancestor indices [B, N] for log weights [B, N] using the named scheme (see SCHEMES)."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown resampling scheme {scheme!r}; choose one of {sorted(SCHEMES)}")
    return SCHEMES[scheme](log_w, generator)
