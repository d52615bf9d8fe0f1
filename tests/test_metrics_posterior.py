"""Posterior metrics: KL/TV against a made-up exact target, log Z spread, ESS summary."""

import math

import pytest
import torch

from llmsample.diagnostics.exact import ExactTarget
from llmsample.metrics import (
    ess_summary,
    kl_q_sigma,
    kl_sigma_q,
    log_z_spread,
    tv_noise_floor,
    tv_to_target,
)
from llmsample.output import SamplingOutput

SEQS = [(0, 8), (1, 8), (2, 8)]
P = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
PHI = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)  # sigma = [0.625, 0.375, 0]


@pytest.fixture
def target():
    return ExactTarget(SEQS, P.log(), PHI.log(), log_psi={})


def lq(*q):
    return torch.tensor(q, dtype=torch.float64).log()


def test_kl_hand_values(target):
    assert kl_q_sigma(target.log_sigma, target) == pytest.approx(0.0, abs=1e-15)
    assert kl_sigma_q(target.log_sigma, target) == pytest.approx(0.0, abs=1e-15)
    q = lq(0.5, 0.5, 0.0)
    assert kl_q_sigma(q, target) == pytest.approx(
        0.5 * math.log(0.5 / 0.625) + 0.5 * math.log(0.5 / 0.375)
    )
    assert kl_sigma_q(q, target) == pytest.approx(
        0.625 * math.log(0.625 / 0.5) + 0.375 * math.log(0.375 / 0.5)
    )


def test_kl_infinite_not_nan(target):
    base = lq(0.5, 0.3, 0.2)  # q = p puts 0.2 where sigma = 0
    assert kl_q_sigma(base, target) == math.inf
    assert kl_sigma_q(base, target) == pytest.approx(
        0.625 * math.log(0.625 / 0.5) + 0.375 * math.log(0.375 / 0.3)
    )
    point = lq(1.0, 0.0, 0.0)  # q misses sigma's mass on sequence 1
    assert kl_sigma_q(point, target) == math.inf
    assert kl_q_sigma(point, target) == pytest.approx(math.log(1 / 0.625))


def test_kl_validates_log_q(target):
    with pytest.raises(ValueError, match="sums to"):
        kl_q_sigma(lq(0.5, 0.3, 0.3), target)
    with pytest.raises(ValueError, match="2 entries but the target has 3"):
        kl_q_sigma(lq(0.5, 0.5), target)
    with pytest.raises(ValueError, match="NaN"):
        kl_sigma_q(torch.tensor([0.0, math.nan, -math.inf]), target)


def test_tv_delegates_with_hand_values(target):
    samples = [(0, 8), (0, 8), (1, 8)]
    # empirical [2/3, 1/3, 0] vs sigma [0.625, 0.375, 0]
    assert tv_to_target(samples, None, target) == pytest.approx(0.5 * (2 / 3 - 0.625) * 2)
    lw = torch.tensor([0.0, 0.0, math.log(2.0)])  # weights 1/4, 1/4, 1/2
    assert tv_to_target(samples, lw, target) == pytest.approx(0.625 - 0.5)
    floor = tv_noise_floor(target, m=3)
    assert floor == target.tv_noise_floor(3) and 0 < floor <= 1
    assert tv_noise_floor(target, m=1000) < floor


def test_log_z_spread_hand_values_and_inf():
    x = torch.tensor(
        [[0.0, 1.0, -math.inf, 0.5], [2.0, -math.inf, -math.inf, 0.5]], dtype=torch.float64
    )
    r = log_z_spread(x)
    per = r["per_prompt"]
    assert per["mean"] == [1.0, -math.inf, -math.inf, 0.5]
    assert per["std"] == [pytest.approx(math.sqrt(2)), math.inf, 0.0, 0.0]
    assert per["log_mean_exp"][0] == pytest.approx(math.log((1 + math.e**2) / 2))
    assert per["log_mean_exp"][1] == pytest.approx(1 - math.log(2))
    assert per["log_mean_exp"][2:] == [-math.inf, pytest.approx(0.5)]
    assert per["num_neg_inf"] == [0, 1, 2, 0]
    assert r["num_seeds"] == 2 and r["mean"] == -math.inf and r["std"] == math.inf
    flat = [v for vals in per.values() for v in vals] + [r[k] for k in per]
    assert not any(math.isnan(v) for v in flat)


def test_log_z_spread_single_seed_list_input_and_errors():
    r = log_z_spread([torch.tensor([1.0, -2.0])])
    assert r["per_prompt"]["std"] == [0.0, 0.0]
    assert r["per_prompt"]["log_mean_exp"] == [1.0, -2.0]
    assert log_z_spread(torch.tensor([1.0, 3.0]))["per_prompt"]["mean"] == [2.0]  # [S] -> B = 1
    with pytest.raises(ValueError, match="NaN"):
        log_z_spread(torch.tensor([[math.nan]]))


def _output(log_weights, ess, resampled):
    b, n = log_weights.shape
    return SamplingOutput(
        method="smc",
        sequences=torch.zeros(b, n, 3, dtype=torch.long),
        prompt_length=1,
        texts=[[""] * n for _ in range(b)],
        log_weights=log_weights,
        log_weights_unnormalized=log_weights,
        log_z=torch.zeros(b),
        ess=ess,
        resampled=resampled,
    )


def test_ess_summary_hand_values():
    lw = torch.tensor(
        [[math.log(0.25)] * 4, [0.0, -math.inf, -math.inf, -math.inf], [-math.inf] * 4],
        dtype=torch.float64,
    )
    ess = torch.tensor([[4.0, 2.0], [1.0, 3.0], [0.0, 0.0]])
    res = torch.tensor([[False, True], [True, True], [False, False]])
    s = ess_summary(_output(lw, ess, res))
    per = s["per_prompt"]
    assert per["final_ess"] == [pytest.approx(4.0), pytest.approx(1.0), 0.0]
    assert per["mean_ess"] == [3.0, 2.0, 0.0] and per["min_ess"] == [2.0, 1.0, 0.0]
    assert per["resample_fraction"] == [0.5, 1.0, 0.0]
    assert s["final_ess"] == pytest.approx(5 / 3) and s["final_ess_frac"] == pytest.approx(5 / 12)
    assert s["resample_fraction"] == pytest.approx(0.5) and s["num_steps"] == 2
    empty = ess_summary(_output(lw[:1], torch.zeros(1, 0), torch.zeros(1, 0, dtype=torch.bool)))
    assert empty["mean_ess"] is None and empty["per_prompt"]["resample_fraction"] == [0.0]
