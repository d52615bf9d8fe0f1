"""SMC against brute-force posteriors on tiny GPT-2 and Llama models (V = 9, T <= 4).

Every check runs a batch of two prompts of different lengths in one call, so left
padding and per-prompt bookkeeping are exercised too. Many independent SMC runs are
obtained by repeating each prompt in the batch (rows never interact across prompts).
"""

import math

import pytest
import torch
from conftest import EOS, continuations, make_model, make_tokenizer, soft_reward

import llmsample
from llmsample.diagnostics.exact import enumerate_target
from llmsample.potentials import Contains, TokenMask
from llmsample.proposals import LMProposal, LocallyOptimal, ModelProposal
from llmsample.twists import Twist

PROMPTS = ["a b", "c d e f"]
T = 4
SOFT = soft_reward()  # log phi = #c - 0.7 #a, scores prefixes too: a valid, non-optimal twist


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def setup(request):
    model, tok = make_model(request.param), make_tokenizer()
    targets = {
        name: [enumerate_target(model, tok, p, pot, T, EOS) for p in PROMPTS]
        for name, pot in {"soft": SOFT, "contains": Contains("c")}.items()
    }
    return model, tok, targets


def assert_unbiased(out, targets, runs):
    """mean(Z_hat / Z) within 3 standard errors of 1, for each prompt."""
    for b, target in enumerate(targets):
        ratio = (out.log_z[b * runs : (b + 1) * runs] - target.log_z).exp()
        se = ratio.std() / math.sqrt(runs)
        assert abs(ratio.mean() - 1) < 3 * se, (PROMPTS[b], ratio.mean(), se)


@pytest.mark.parametrize("scheme", ["multinomial", "stratified", "systematic", "residual"])
def test_z_hat_unbiased_with_resampling(setup, scheme):
    model, tok, targets = setup
    runs = 200
    out = llmsample.smc_generate(
        model,
        tok,
        [p for p in PROMPTS for _ in range(runs)],
        potential=SOFT,
        twist="prefix",
        num_particles=8,
        max_new_tokens=T,
        resampling=scheme,
        ess_threshold=0.7,
        seed=1,
    )
    assert out.resampled.any(), "the test must exercise resampling"
    assert_unbiased(out, targets["soft"], runs)


def test_resampling_every_k_tokens_is_unbiased(setup):
    """Particles advance K = 2 tokens between resampling steps (fixed times, exact weights)."""
    model, tok, targets = setup
    runs = 200
    cfg = llmsample.SMCConfig(
        num_particles=8, max_new_tokens=T, ess_threshold=2.0, resample_every=2, seed=1
    )
    prompts = [p for p in PROMPTS for _ in range(runs)]
    out = llmsample.smc_generate(model, tok, prompts, potential=SOFT, twist="prefix", config=cfg)
    steps = out.resampled.any(dim=0).tolist()  # [T]: did any run resample after token t+1
    assert steps[1] and not steps[0] and not steps[2:].count(True), steps
    assert_unbiased(out, targets["soft"], runs)


@pytest.mark.filterwarnings("ignore:the potential rejected every particle")  # Z_hat = 0 runs
@pytest.mark.parametrize(
    "proposal", ["base", "tempered", "other_model"], ids=lambda p: f"proposal={p}"
)
def test_z_hat_unbiased_hard_constraint(setup, proposal):
    model, tok, targets = setup
    runs = 200
    q = {
        "base": None,
        "tempered": LMProposal(temperature=1.5),
        "other_model": ModelProposal(make_model("gpt2", seed=7, scale=1.0)),
    }[proposal]
    out = llmsample.smc_generate(
        model,
        tok,
        [p for p in PROMPTS for _ in range(runs)],
        potential=Contains("c"),
        proposal=q,
        num_particles=8,
        max_new_tokens=T,
        ess_threshold=1.5,
        seed=3,
    )
    assert out.resampled.any()
    assert_unbiased(out, targets["contains"], runs)


class ExactTwist(Twist):
    """The optimal twist psi*(x_<=t) = E_p[phi | x_<=t], read off the enumeration."""

    def __init__(self, targets):
        self.targets = targets
        self.phi = [dict(zip(t.sequences, t.log_phi.tolist())) for t in targets]

    def _score(self, b, seq, complete):
        return self.phi[b][seq] if complete else self.targets[b].log_psi[seq]

    def prefix(self, x):
        return torch.tensor(
            [
                self._score(b, tuple(s), False)
                for b, s in zip(x.prompt_index.tolist(), x.token_lists())
            ],
            dtype=torch.float64,
        )

    def next_token(self, x):
        rows = []
        for b, s in zip(x.prompt_index.tolist(), x.token_lists()):
            s = tuple(s)
            last = len(s) + 1 == x.max_new_tokens
            rows.append([self._score(b, s + (v,), v == EOS or last) for v in range(x.vocab_size)])
        return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("scheme", ["multinomial", "systematic"])
def test_exact_twist_and_optimal_proposal_give_exact_log_z(setup, scheme):
    model, tok, targets = setup
    for name in ("soft", "contains"):
        out = llmsample.smc_generate(
            model,
            tok,
            PROMPTS,
            potential=SOFT if name == "soft" else Contains("c"),
            twist=ExactTwist(targets[name]),
            proposal=LocallyOptimal(),
            num_particles=16,
            max_new_tokens=T,
            resampling=scheme,
            ess_threshold=1.5,
            seed=3,
        )
        exact = torch.tensor([t.log_z for t in targets[name]], dtype=torch.float64)
        assert torch.allclose(out.log_z, exact, atol=1e-5, rtol=0), (out.log_z, exact)
        assert torch.allclose(out.ess, torch.full_like(out.ess, 16.0))  # all weights equal


def test_token_mask_optimal_proposal_rejection_free(setup):
    """TokenMask offers token scores: q ∝ p·1[allowed] never proposes a banned token."""
    model, tok, _ = setup
    out = llmsample.smc_generate(
        model,
        tok,
        PROMPTS,
        potential=TokenMask(allowed=[0, 1]),
        twist="prefix",
        proposal="optimal",
        num_particles=32,
        max_new_tokens=T,
        seed=0,
    )
    assert set(out.continuations.flatten().tolist()) <= {0, 1, EOS}
    for b, p in enumerate(PROMPTS):
        exact = enumerate_target(model, tok, p, TokenMask(allowed=[0, 1]), T, EOS).log_z
        assert torch.isfinite(out.log_z[b]) and abs(float(out.log_z[b]) - exact) < 1.0


def test_weighted_particles_match_posterior_within_noise_floor(setup):
    """TV(weighted particles, sigma) <= 99th percentile of TV for exact draws.

    Weighted particles with effective sample size n carry about the information of n
    exact draws, so the noise floor is computed for m = floor(ESS) exact iid draws, by
    simulation inside ExactTarget.tv_noise_floor. A negative control (the same
    particles with the weights thrown away) must exceed that floor, which shows the
    check has the power to catch wrong weights.
    """
    model, tok, _ = setup
    t3 = 3  # 585 complete sequences: N = 4096 particles resolve sigma well
    out = llmsample.smc_generate(
        model,
        tok,
        PROMPTS,
        potential=SOFT,
        twist="prefix",
        num_particles=4096,
        max_new_tokens=t3,
        ess_threshold=0.5,
        seed=4,
    )
    for b, p in enumerate(PROMPTS):
        target = enumerate_target(model, tok, p, SOFT, t3, EOS)
        samples = continuations(out, b)
        m = int(llmsample.smc.resampling.ess(out.log_weights[b]))
        floor = target.tv_noise_floor(m, q=0.99)
        assert target.tv(samples, out.log_weights[b]) < floor
        assert target.tv(samples) > floor  # unweighted: wrong distribution, caught


@pytest.mark.filterwarnings("ignore:the potential rejected every particle")
@pytest.mark.parametrize("twist", ["none", "prefix"])
def test_stop_guard_keeps_z_hat_unbiased_and_never_ends_rejected(setup, twist):
    """stop_guard removes EOS from q where Contains("c") rejects the reply so far: Z_hat
    stays unbiased, and no particle ends at EOS with phi = 0 (only cuts at T can)."""
    model, tok, targets = setup
    runs = 200
    pot = Contains("c", prefix_bonus=1.0) if twist == "prefix" else Contains("c")
    kw = dict(potential=pot, twist=twist, num_particles=8, max_new_tokens=T, seed=5)
    prompts = [p for p in PROMPTS for _ in range(runs)]
    out = llmsample.smc_generate(model, tok, prompts, stop_guard=True, **kw)
    assert_unbiased(out, targets["contains"], runs)
    ended = [continuations(out, b) for b in range(len(prompts))]
    eos_rejected = [
        s
        for rows, lw in zip(ended, out.log_weights)
        for s, w in zip(rows, lw.tolist())
        if s[-1] == EOS and w == -math.inf
    ]
    assert not eos_rejected
    plain = llmsample.smc_generate(model, tok, prompts, **kw)
    dead = lambda o: (~torch.isfinite(o.log_weights)).float().mean().item()  # noqa: E731
    assert dead(out) < dead(plain)  # the guard's point: fewer particles die at EOS
