"""Tests for llmsample.smc.resampling.

Statistical tests put M seeded repetitions in the batch dim of a single call and compare
offspring-count moments with their exact values, with tolerances of 4.5 standard errors that
are estimated from the same samples (never loose constants).
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmsample.smc.resampling import SCHEMES, _invert_cdf, ess, log_normalize, resample

NINF = -math.inf
ALL = list(SCHEMES)
M = 20_000  # repetitions per statistical test
Z = 4.5  # standard errors allowed

PROPS = settings(max_examples=150, deadline=None, database=None)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def offspring(anc: torch.Tensor, n: int) -> torch.Tensor:
    """Offspring counts [B, N] (float64) from ancestor indices [B, N]."""
    return torch.zeros(anc.shape[0], n, dtype=torch.float64).scatter_add_(
        1, anc, torch.ones_like(anc, dtype=torch.float64)
    )


def _log(ws: list[float]) -> torch.Tensor:
    return torch.tensor(ws, dtype=torch.float64).log()  # log(0) = -inf


# One weight vector per case, N = 8. The smallest nonzero weight in each is large enough that
# it is picked hundreds of times in M rows, so empirical standard errors are meaningful.
WEIGHTS = {
    "random": torch.randn(8, generator=gen(123), dtype=torch.float64),
    "neg_inf_ends": torch.tensor([NINF, 0.3, NINF, 1.2, 0.0, -0.7, 0.1, NINF]),
    "uneven": torch.tensor([6.0, 0.0, 0.0, NINF, 0.0, -1.0, 0.5, NINF]),
    "integral": _log([0.5, 0.25, 0.125, 0.125, 0, 0, 0, 0]),  # N w = 4, 2, 1, 1, 0...
    "fractional": _log([2.5, 1.5, 0, 0.25, 0.75, 3.0, 0, 0]),  # N w = these (sum 8)
    "single": torch.tensor([NINF, NINF, NINF, NINF, NINF, -3.0, NINF, NINF]),
    "float32": torch.tensor([0.0, -2.0, 1.0, NINF, 0.5, -0.5, 0.0, 2.0], dtype=torch.float32),
}


def run_many(name: str, scheme: str, seed: int = 7):
    lw = WEIGHTS[name]
    n = lw.shape[0]
    w = torch.softmax(lw.double(), dim=0)
    anc = resample(lw.expand(M, n), scheme, gen(seed))  # M independent rows, one call
    return n, w, offspring(anc, n)


def var_and_margin(c: torch.Tensor):
    """Unbiased per-column sample variance s2 and the noise margin allowed around it.

    First-order (delta method) standard error of s2 is sqrt((m4 - s2^2) / M). We use the
    empirical fourth central moment m4 rather than the normal-theory s2 sqrt(2 / (M - 1)):
    offspring counts of light particles are Bernoulli-like with huge kurtosis, for which the
    normal formula underestimates the noise by a factor 1/sqrt(2p). The first-order term
    vanishes for a fair coin (m4 = s2^2), where the error comes from estimating the mean:
    s2 is off by about (mean - mu)^2 <= (Z SE(mean))^2 = Z^2 s2 / M, so that is added too.
    """
    m = c.shape[0]
    d = c - c.mean(dim=0)
    s2 = (d**2).sum(dim=0) / (m - 1)
    se = ((d**4).mean(dim=0) - s2**2).clamp(min=0).div(m).sqrt()
    return s2, Z * se + Z**2 * s2 / m


def exact_variance(scheme: str, n: int, w: torch.Tensor) -> torch.Tensor:
    """Exact per-particle variance of the offspring count under each scheme."""
    nw = n * w
    if scheme == "multinomial":  # Binomial(N, w_i)
        return nw * (1 - w)
    if scheme == "systematic":  # floor(N w_i) or ceil, P(ceil) = frac(N w_i)
        f = nw - nw.floor()
        return f * (1 - f)
    if scheme == "residual":  # floor(N w_i) + Binomial(R, rest_i / R)
        rest = nw - nw.floor()
        r = rest.sum()
        p = rest / r if r > 0.5 else torch.zeros_like(rest)
        return r.round() * p * (1 - p)
    # stratified: sum over strata j of independent Bernoulli(p_ij), where p_ij is N times the
    # overlap of particle i's cdf interval with stratum [j/N, (j+1)/N)
    hi = w.cumsum(0)
    lo = hi - w
    j = torch.arange(n, dtype=torch.float64)
    overlap = torch.minimum(hi[:, None], (j + 1) / n) - torch.maximum(lo[:, None], j / n)
    p = n * overlap.clamp(min=0)
    return (p * (1 - p)).sum(dim=1)


# ----------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("name", WEIGHTS)
@pytest.mark.parametrize("scheme", ALL)
def test_unbiased(scheme, name):
    n, w, c = run_many(name, scheme)
    mean, se = c.mean(dim=0), c.std(dim=0) / math.sqrt(M)
    target = n * w
    det = se == 0  # count never varied: it must then be exactly N w_i
    assert torch.allclose(mean[det], target[det], rtol=0, atol=1e-9), (mean, target)
    z = (mean[~det] - target[~det]).abs() / se[~det]
    assert (z < Z).all(), f"mean offspring off by {z.max():.2f} SE: {mean} vs {target}"
    assert (c.sum(dim=1) == n).all()


@pytest.mark.parametrize("name", WEIGHTS)
@pytest.mark.parametrize("scheme", ALL)
def test_variance_matches_exact(scheme, name):
    n, w, c = run_many(name, scheme, seed=11)
    s2, margin = var_and_margin(c)
    v = exact_variance(scheme, n, w)
    zero = v < 1e-12  # deterministic counts: no variance at all
    assert (s2[zero] == 0).all(), (s2, v)
    assert ((s2 - v).abs()[~zero] <= margin[~zero]).all(), f"variance {s2} vs exact {v}"


@pytest.mark.parametrize("name", WEIGHTS)
@pytest.mark.parametrize("scheme", ["stratified", "systematic", "residual"])
def test_variance_at_most_multinomial(scheme, name):
    # One-sided: empirical variance <= N w (1 - w) plus the noise margin of the estimate.
    n, w, c = run_many(name, scheme, seed=13)
    s2, margin = var_and_margin(c)
    assert (s2 <= n * w * (1 - w) + margin).all(), (s2, n * w * (1 - w))


@pytest.mark.parametrize("name", WEIGHTS)
def test_structural_count_bounds(name):
    n, w, c = run_many(name, "systematic")
    nw = n * w
    tol = 1e-9  # floor/ceil of an N w_i that is integral up to rounding
    assert ((c >= (nw - tol).floor()) & (c <= (nw + tol).ceil())).all()
    _, _, c = run_many(name, "residual")
    assert (c >= (nw - tol).floor()).all()


# ----------------------------------------------------------------------------- properties

log_weight = st.one_of(
    st.floats(-1e30, 1e30, allow_nan=False, allow_infinity=False),
    st.sampled_from([NINF, 0.0, 1e30, -1e30, 745.0, -745.0, 1e-300]),
)


@st.composite
def weight_batches(draw, elements=log_weight, dtypes=(torch.float32, torch.float64)):
    n = draw(st.integers(1, 12))
    b = draw(st.integers(1, 4))
    rows = [draw(st.lists(elements, min_size=n, max_size=n)) for _ in range(b)]
    if draw(st.booleans()):
        rows[draw(st.integers(0, b - 1))] = [NINF] * n  # make sure dead rows show up
    return torch.tensor(rows, dtype=draw(st.sampled_from(dtypes)))


@PROPS
@given(lw=weight_batches(), scheme=st.sampled_from(ALL), seed=st.integers(0, 2**32 - 1))
def test_resample_properties(lw, scheme, seed):
    b, n = lw.shape
    anc = resample(lw, scheme, gen(seed))
    assert anc.shape == (b, n) and anc.dtype == torch.long and anc.device == lw.device
    assert ((anc >= 0) & (anc < n)).all()
    assert (anc.diff(dim=-1) >= 0).all()  # sorted
    dead = (lw == NINF).all(dim=-1)
    assert torch.equal(anc[dead], torch.arange(n).expand(int(dead.sum()), n))
    assert not (lw.gather(1, anc)[~dead] == NINF).any()
    # stronger: never a particle whose normalized float64 weight underflows to zero
    w = log_normalize(lw.double()).exp()
    assert (w.gather(1, anc)[~dead] > 0).all()


@PROPS
@given(lw=weight_batches())
def test_log_normalize_and_ess_properties(lw):
    n = lw.shape[1]
    dead = (lw == NINF).all(dim=-1)
    ln, e = log_normalize(lw), ess(lw)
    assert not ln.isnan().any() and not e.isnan().any()
    assert e.shape == lw.shape[:1] and e.dtype == lw.dtype
    assert (ln[dead] == NINF).all() and (e[dead] == 0).all()
    eps = torch.finfo(lw.dtype).eps
    assert (ln <= 0).all()
    assert (torch.logsumexp(ln[~dead].double(), dim=-1).abs() <= 4 * n * eps).all()
    assert ((e[~dead] >= 1 - 4 * eps) & (e[~dead] <= n * (1 + 4 * eps))).all()


@PROPS
@given(
    n=st.integers(1, 12),
    data=st.data(),
    value=st.floats(-1e30, 1e30, allow_nan=False),
    scheme=st.sampled_from(ALL),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_single_finite_weight(n, data, value, scheme, dtype):
    k = data.draw(st.integers(0, n - 1))
    lw = torch.full((3, n), NINF, dtype=dtype)
    lw[:, k] = value
    assert (resample(lw, scheme, gen()) == k).all()
    assert (ess(lw) == 1).all()
    ln = log_normalize(lw)
    assert (ln[:, k] == 0).all() and (ln.isinf().sum(dim=-1) == n - 1).all()


@PROPS
@given(
    n=st.integers(1, 64),
    value=st.floats(-1e30, 1e30, allow_nan=False),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_equal_weights_ess_is_n(n, value, dtype):
    e = ess(torch.full((2, n), value, dtype=dtype))
    assert torch.allclose(e.double(), torch.full((2,), float(n), dtype=torch.float64), rtol=1e-6)


@PROPS
@given(
    lw=weight_batches(
        elements=st.one_of(st.floats(-100, 100), st.just(NINF)), dtypes=(torch.float64,)
    ),
    c=st.floats(-50, 50),
    scheme=st.sampled_from(ALL),
    seed=st.integers(0, 2**32 - 1),
)
def test_shift_invariance(lw, c, scheme, seed):
    a = resample(lw, scheme, gen(seed))
    assert torch.equal(a, resample(lw + c, scheme, gen(seed)))


@pytest.mark.parametrize("scheme", ALL)
@pytest.mark.parametrize("n", [1, 2, 7])
def test_dead_row_is_identity(scheme, n):
    lw = torch.full((3, n), NINF)
    assert torch.equal(resample(lw, scheme, gen()), torch.arange(n).expand(3, n))
    assert (ess(lw) == 0).all() and (log_normalize(lw) == NINF).all()


def test_huge_magnitudes():
    lw = torch.tensor([[1e30, 1e30, -1e30, NINF], [-1e30, -1e30, -1e30, -1e30]])
    ln = log_normalize(lw)
    assert torch.allclose(ln[0, :2], torch.full((2,), -math.log(2)))
    assert torch.allclose(ln[1], torch.full((4,), -math.log(4)))
    assert torch.allclose(ess(lw), torch.tensor([2.0, 4.0]))


# ----------------------------------------------------------------------------- edge cases


def test_invert_cdf_never_picks_zero_weight_even_at_u_one():
    # float64 sums of 0.1 fall short of 1, and u = 1 can arise from rounding (N - 1 + U) / N:
    # neither may ever land on the trailing (or leading) zero-weight particles.
    w = torch.tensor([[0.0, 0.1] + [0.1] * 9 + [0.0, 0.0], [0.0] * 12 + [1.0]], dtype=torch.float64)
    u = torch.tensor([0.0, 0.5, 1 - 2**-53, 1.0], dtype=torch.float64)
    u = torch.cat([u, torch.linspace(0, 1, w.shape[1] - 4, dtype=torch.float64)]).expand(2, -1)
    idx = _invert_cdf(w, u)
    assert (w.gather(1, idx) > 0).all(), idx
    assert idx[0, 3] == 10 and (idx[1] == 12).all()


@pytest.mark.parametrize("scheme", ALL)
def test_rows_keep_their_own_support(scheme):
    rows = torch.tensor(
        [
            [0.0, 0.0, NINF, NINF, NINF, NINF],  # support {0, 1}
            [NINF, NINF, NINF, NINF, NINF, 2.0],  # support {5}
            [NINF] * 6,  # dead -> identity
            [NINF, 1.0, NINF, -1.0, NINF, 0.0],  # support {1, 3, 5}
        ]
    )
    reps = 500
    anc = resample(rows.repeat(reps, 1), scheme, gen(3)).view(reps, 4, 6)
    support = rows > NINF
    for r in (0, 1, 3):
        seen = torch.zeros(6, dtype=torch.bool)
        seen[anc[:, r].unique()] = True
        assert torch.equal(seen, support[r]), (r, seen)  # inside support, and all of it reached
    assert torch.equal(anc[:, 2], torch.arange(6).expand(reps, 6))


@pytest.mark.parametrize("scheme", ALL)
def test_determinism_and_generator_only(scheme):
    lw = torch.randn(16, 50, generator=gen(5))
    torch.manual_seed(1)
    a = resample(lw, scheme, gen(42))
    torch.manual_seed(2)  # global RNG state must not matter
    assert torch.equal(a, resample(lw, scheme, gen(42)))
    assert not torch.equal(a, resample(lw, scheme, gen(43)))
    assert torch.equal(a, SCHEMES[scheme](lw, gen(42)))  # dispatch is the plain function


def test_default_scheme_is_systematic():
    lw = torch.randn(4, 9, generator=gen(8))
    assert torch.equal(resample(lw, generator=gen(1)), SCHEMES["systematic"](lw, gen(1)))


def test_empty_batch():
    for scheme in ALL:
        assert resample(torch.zeros(0, 5), scheme, gen()).shape == (0, 5)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("scheme", ALL)
@pytest.mark.parametrize(
    "lw, match",
    [
        (torch.zeros(5), r"2-D.*shape \(5,\)"),
        (torch.zeros(2, 3, 4), r"2-D.*shape \(2, 3, 4\)"),
        (torch.zeros(2, 0), r"N >= 1.*shape \(2, 0\)"),
        (torch.zeros(2, 3, dtype=torch.long), r"floating.*torch.int64"),
        (torch.tensor([[0.0, math.nan, 1.0]]), "NaN"),
        (torch.tensor([[0.0, math.inf, 1.0]]), r"\+inf"),
    ],
)
def test_invalid_log_weights(scheme, lw, match):
    with pytest.raises(ValueError, match=match):
        resample(lw, scheme, gen())


def test_unknown_scheme():
    with pytest.raises(ValueError, match=r"'bogus'.*multinomial.*residual.*stratified.*systematic"):
        resample(torch.zeros(1, 3), "bogus")
