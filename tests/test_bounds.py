"""Bidirectional bounds on log Z (llmsample.diagnostics.bounds) against brute-force enumeration.

Lower: plain SMC, E[log Z_hat] <= log Z. Upper: conditional SMC with row 0 clamped to an
exact posterior sample, E[log Z_hat] >= log Z. Many independent runs come from repeating
one prompt in the batch (rows never interact across prompts); exact references are drawn
from the enumerated sigma. Tolerances are 3 standard errors over the runs.
"""

import math

import pytest
import torch
from conftest import EOS, make_model, make_tokenizer, soft_reward

from llmsample.diagnostics.bounds import (
    LogZBounds,
    joint_infill_samples,
    log_z_bounds,
    log_z_bounds_sweep,
    log_z_lower,
    log_z_upper,
)
from llmsample.diagnostics.exact import enumerate_target
from llmsample.hf.prompts import encode_prompts
from llmsample.metrics import bound_gap
from llmsample.potentials import Contains, SuffixLikelihood
from llmsample.proposals import LocallyOptimal
from llmsample.smc import SMCConfig, run_smc
from llmsample.smc.conditional import conditional_multinomial
from llmsample.twists import PotentialTwist, Twist

PROMPT = "a b"
T = 3  # 585 complete continuations
RUNS = 300
SOFT = soft_reward(2.0, 1.5)  # prefix and complete score: a valid, non-optimal twist, far from p


@pytest.fixture(scope="module")
def setup():
    model, tok = make_model("gpt2"), make_tokenizer()
    return model, tok, enumerate_target(model, tok, PROMPT, SOFT, T, EOS)


def draws(log_probs, sequences, m, seed):
    """m iid draws from exp(log_probs) over ``sequences``."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.multinomial(log_probs.exp(), m, replacement=True, generator=gen)
    return [sequences[i] for i in idx.tolist()]


def bounds(setup, n, twist="none", runs=RUNS, reference_from="sigma", seed=0, **kw):
    """``runs`` lower and ``runs`` upper log Z_hat (each [runs]), resampling at every step."""
    model, tok, target = setup
    kw = dict(max_new_tokens=T, ess_threshold=1.5, twist=twist, eos_token_id=EOS) | kw
    log_probs = target.log_sigma if reference_from == "sigma" else target.log_p
    refs = draws(log_probs, target.sequences, runs, seed=100 + n + seed)
    prompts = [PROMPT] * runs
    lo = log_z_lower(model, tok, prompts, SOFT, n, [seed], **kw)[0]
    up = log_z_upper(model, tok, prompts, SOFT, n, [seed + 1], [refs], **kw)[0]
    return lo, up


def cut(row):
    """A continuation row as a complete continuation: up to its first EOS."""
    return tuple(row[: row.index(EOS) + 1] if EOS in row else row)


def mean_se(x):
    return float(x.mean()), float(x.std() / math.sqrt(len(x)))


def csmc(setup, refs, n=8, potential=SOFT, twist=None, proposal=None, **kw):
    """run_smc with one prompt copy per reference, resampling at every step."""
    model, tok, _ = setup
    batch = encode_prompts(tok, [PROMPT] * len(refs))
    cfg = SMCConfig(num_particles=n, max_new_tokens=T, ess_threshold=1.5, seed=0, **kw)
    kw = dict(twist=twist, proposal=proposal, eos_token_ids=[EOS], reference=refs)
    return run_smc(model, tok, batch, potential, cfg, **kw)


# ----------------------------------------------------------------------------- the clamp


@pytest.mark.parametrize("scheme", ["multinomial", "systematic"])
def test_reference_row_is_clamped_and_others_are_random(setup, scheme):
    _, _, target = setup
    refs = draws(target.log_sigma, target.sequences, 60, seed=0)
    out = csmc(setup, refs, resampling=scheme)
    assert out.resampled[:, 0].all()  # resampled (conditionally) at least at step 0
    padded = torch.full((len(refs), T), EOS)
    for b, r in enumerate(refs):
        padded[b, : len(r)] = torch.tensor(r)
    assert torch.equal(out.continuations[:, 0], padded)
    assert torch.isfinite(out.log_weights_unnormalized[:, 0]).all()
    same = (out.continuations[:, 1:] == padded[:, None]).all(-1).float().mean()
    assert same < 0.5, float(same)  # the other rows are fresh draws, not copies of x*
    assert len({tuple(r) for r in out.continuations[:, 1:].reshape(-1, T).tolist()}) > 20


@pytest.mark.parametrize("twist", ["none", "prefix"])
def test_single_clamped_particle_weight_is_phi(setup, twist):
    """N = 1, q = p: Z_hat = p(x*) phi(x*) / q(x*) = phi(x*) exactly (a twist telescopes)."""
    model, tok, target = setup
    refs = draws(target.log_sigma, target.sequences, 40, seed=1)
    kw = dict(max_new_tokens=T, twist=twist, eos_token_id=EOS, ess_threshold=1.5)
    up = log_z_upper(model, tok, [PROMPT] * 40, SOFT, 1, [0], [refs], **kw)[0]
    phi = dict(zip(target.sequences, target.log_phi.tolist()))
    torch.testing.assert_close(up, torch.tensor([phi[r] for r in refs], dtype=torch.float64))


def test_conditional_multinomial_resampling():
    """Clamped pools keep slot 0 on itself; every other slot is a draw from the whole pool."""
    g, n = 20_000, 4
    w = torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=torch.float64)
    clamped = torch.arange(g) % 2 == 0
    anc = conditional_multinomial(w.log().expand(g, n), clamped, torch.Generator().manual_seed(0))
    assert (anc[clamped, 0] == 0).all() and (anc != 3).all()
    for draws in (anc[clamped, 1:].flatten(), anc[~clamped].flatten()):
        freq = torch.bincount(draws, minlength=n).double() / len(draws)
        se = (w * (1 - w) / len(draws)).sqrt()
        assert ((freq - w).abs() <= 4 * se + 1e-12).all(), freq


@pytest.mark.parametrize("n, twist", [(2, False), (4, True)])
def test_particle_gibbs_keeps_sigma_invariant(setup, n, twist):
    """x* ~ sigma, then one particle of the conditional run drawn by weight is again ~ sigma
    (the conditional SMC kernel is sigma-invariant): checked on the law of the first token
    (every category within 4 standard errors) and on the mean of log phi."""
    _, _, target = setup
    runs = 2000
    refs = draws(target.log_sigma, target.sequences, runs, seed=n)
    out = csmc(setup, refs, n=n, twist=PotentialTwist(SOFT) if twist else None)
    gen = torch.Generator().manual_seed(n)
    k = torch.multinomial(out.log_weights.exp(), 1, generator=gen)[:, 0]
    picked = [cut(r) for r in out.continuations[torch.arange(runs), k].tolist()]
    sigma = target.log_sigma.exp()
    first = torch.zeros(9, dtype=torch.float64).index_add_(
        0, torch.tensor([s[0] for s in target.sequences]), sigma
    )
    freq = torch.bincount(torch.tensor([s[0] for s in picked]), minlength=9).double() / runs
    assert ((freq - first).abs() <= 4 * (first * (1 - first) / runs).sqrt() + 1e-12).all()
    phi = dict(zip(target.sequences, target.log_phi.tolist()))
    m, se = mean_se(torch.tensor([phi[s] for s in picked]))
    assert abs(m - float(sigma @ target.log_phi)) < 4 * se, (m, se)


class ExactTwist(Twist):
    """The optimal twist psi*(x_<=t) = E_p[phi | x_<=t], read off the enumeration."""

    def __init__(self, target):
        self.target, self.phi = target, dict(zip(target.sequences, target.log_phi.tolist()))

    def prefix(self, x):
        return torch.tensor([self.target.log_psi[tuple(s)] for s in x.token_lists()])

    def next_token(self, x):
        rows = []
        for s in map(tuple, x.token_lists()):
            last = len(s) + 1 == x.max_new_tokens
            ext = [s + (v,) for v in range(x.vocab_size)]
            rows.append(
                [self.phi[e] if e[-1] == EOS or last else self.target.log_psi[e] for e in ext]
            )
        return torch.tensor(rows, dtype=torch.float64)


def test_exact_twist_gives_exact_log_z_with_a_reference(setup):
    """Optimal twist + locally optimal proposal: every weight equals Z, the clamped row's
    too (its weight uses log q of the reference tokens under q != p)."""
    _, _, target = setup
    refs = draws(target.log_sigma, target.sequences, 30, seed=2)
    out = csmc(setup, refs, twist=ExactTwist(target), proposal=LocallyOptimal())
    torch.testing.assert_close(out.log_z, torch.full((30,), target.log_z, dtype=torch.float64))


# ----------------------------------------------------------------------------- the bounds


@pytest.mark.parametrize("twist", ["none", "prefix"])
@pytest.mark.parametrize("n", [2, 8, 32])
def test_sandwich(setup, n, twist):
    """mean lower <= log Z <= mean upper, within 3 standard errors."""
    log_z = setup[2].log_z
    (lo, lo_se), (up, up_se) = map(mean_se, bounds(setup, n, twist))
    assert lo <= log_z + 3 * lo_se, (lo, lo_se, log_z)
    assert up >= log_z - 3 * up_se, (up, up_se, log_z)


def test_sandwich_importance_sampling(setup):
    """Without resampling the bounds are IWAE's and its conditional (clamped) version."""
    log_z = setup[2].log_z
    (lo, lo_se), (up, up_se) = map(mean_se, bounds(setup, 8, ess_threshold=0.0))
    assert lo <= log_z + 3 * lo_se and up >= log_z - 3 * up_se, (lo, lo_se, up, up_se)


@pytest.mark.parametrize("twist", ["none", "prefix"])
def test_gap_shrinks_with_particles(setup, twist):
    gaps = {}
    for n in (2, 32):
        (lo, lo_se), (up, up_se) = map(mean_se, bounds(setup, n, twist))
        gaps[n] = (up - lo, math.hypot(lo_se, up_se))
    (g2, s2), (g32, s32) = gaps[2], gaps[32]
    assert g32 > -3 * s32 and g2 - g32 > 3 * math.hypot(s2, s32), gaps


def test_csmc_z_hat_is_biased_upwards_smc_is_not(setup):
    """E[Z_hat / Z] = 1 for SMC; for conditional SMC it is E_smc[(Z_hat / Z)^2] > 1."""
    log_z = setup[2].log_z
    lo, up = bounds(setup, 2, runs=2 * RUNS)
    r_lo, r_up = (lo - log_z).exp(), (up - log_z).exp()
    m, se = mean_se(r_lo)
    assert abs(m - 1) < 3 * se, (m, se)
    m, se = mean_se(r_up)
    assert m - 1 > 3 * se, (m, se)


def test_reference_from_p_is_no_upper_bound(setup):
    """Negative control: seeded with x* ~ p (not sigma), no twist, q = p, conditional SMC is
    plain SMC in law and falls well below log Z: the upper bound needs exact samples."""
    log_z = setup[2].log_z
    up, up_se = mean_se(bounds(setup, 2, reference_from="p")[1])
    assert up < log_z - 3 * up_se, (up, up_se, log_z)


def test_log_z_bounds_api(setup):
    model, tok, target = setup
    seeds = [0, 1, 2]
    refs = [draws(target.log_sigma, target.sequences, 2, seed=s) for s in seeds]
    kw = dict(max_new_tokens=T, eos_token_id=EOS, twist="prefix")
    res = log_z_bounds(model, tok, [PROMPT, PROMPT], SOFT, 4, seeds, refs, **kw)
    assert isinstance(res, LogZBounds) and res.num_particles == 4
    assert res.lower_runs.shape == res.upper_runs.shape == (3, 2)
    torch.testing.assert_close(res.lower, res.lower_runs.mean(0))
    torch.testing.assert_close(res.gap, res.upper - res.lower)
    assert torch.isfinite(res.gap_se).all() and res.summary()["num_particles"] == 4
    sweep = log_z_bounds_sweep(model, tok, [PROMPT, PROMPT], SOFT, [1, 4], seeds, refs, **kw)
    assert sorted(sweep) == [1, 4] and sweep[4].upper_runs.shape == (3, 2)
    with pytest.raises(ValueError, match="references has 2 entries for 3 seeds"):
        log_z_upper(model, tok, [PROMPT, PROMPT], SOFT, 4, seeds, refs[:2], **kw)


# ----------------------------------------------------------------------------- infilling


def test_joint_infill_samples_give_an_upper_bound(setup):
    """Synthetic infilling problems: x ~ p(x|c), s ~ p(s|c,x). Averaged over problems,
    lower <= exact log Z(c, s) <= upper (N = 2, where the gap is wide)."""
    model, tok, _ = setup
    k = 48
    prompts, suffixes, refs = joint_infill_samples(model, tok, [PROMPT] * k, T, 2, seed=0)
    assert prompts == [PROMPT] * k and len(set(suffixes)) > 5
    for r in refs:
        assert r[-1] == EOS or len(r) == T
    pot = SuffixLikelihood(model, tok, suffixes)
    exact = {
        s: enumerate_target(model, tok, PROMPT, SuffixLikelihood(model, tok, s), T, EOS).log_z
        for s in set(suffixes)
    }
    exact = torch.tensor([exact[s] for s in suffixes])
    kw = dict(max_new_tokens=T, eos_token_id=EOS, ess_threshold=1.5)
    lo = log_z_lower(model, tok, prompts, pot, 2, [0], **kw)[0] - exact
    up = log_z_upper(model, tok, prompts, pot, 2, [1], [refs], **kw)[0] - exact
    (lo, lo_se), (up, up_se) = mean_se(lo), mean_se(up)
    assert lo <= 3 * lo_se and up >= -3 * up_se, (lo, lo_se, up, up_se)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "ref, match",
    [
        ((0, 1), "not a complete continuation"),
        ((0, EOS, 1), "tokens after its EOS"),
        ((), "must be 1 to max_new_tokens"),
        ((0, 1, 2, 3), "must be 1 to max_new_tokens"),
        ((0, 99, EOS), r"token ids in \[0, 9\)"),
    ],
)
def test_incomplete_or_malformed_reference_raises(setup, ref, match):
    with pytest.raises(ValueError, match=match):
        csmc(setup, [ref])


def test_reference_count_and_support_checked(setup):
    model, tok, _ = setup
    batch = encode_prompts(tok, [PROMPT, PROMPT])
    cfg = SMCConfig(num_particles=4, max_new_tokens=T, seed=0)
    with pytest.raises(ValueError, match="1 continuations for 2 prompts"):
        run_smc(model, tok, batch, SOFT, cfg, eos_token_ids=[EOS], reference=[(EOS,)])
    with pytest.raises(ValueError, match="reference of prompt.*weight of 0"):
        csmc(setup, [(0, EOS)], potential=Contains("c"))  # "a" has phi = 0


def test_bound_gap():
    lower = torch.tensor([[1.0, -math.inf], [3.0, 0.0]], dtype=torch.float64)
    upper = torch.tensor([[4.0, 1.0], [6.0, 1.0], [5.0, 1.0]], dtype=torch.float64)
    res = bound_gap(lower, upper)
    per = res["per_prompt"]
    assert per["lower"] == [2.0, -math.inf] and per["upper"] == [5.0, 1.0]
    assert per["gap"] == [3.0, math.inf] and per["lower_se"] == [1.0, math.inf]
    assert per["upper_se"][0] == pytest.approx(1 / math.sqrt(3))
    assert per["gap_se"][0] == pytest.approx(math.sqrt(1 + 1 / 3))
    assert res["num_lower"] == 2 and res["num_upper"] == 3 and res["gap"] == math.inf
    one = bound_gap(torch.tensor([1.0]), torch.tensor([2.0]))
    assert one["gap"] == 1.0 and one["gap_se"] == math.inf
    with pytest.raises(ValueError, match="upper contains -inf"):
        bound_gap(lower, torch.full((2, 2), -math.inf))
    with pytest.raises(ValueError, match="2 prompts but upper has 1"):
        bound_gap(lower, torch.zeros(3, 1))
    with pytest.raises(ValueError, match="NaN"):
        bound_gap(torch.tensor([math.nan]), torch.tensor([0.0]))
