"""FlowTwist: a GFlowNet policy's implied flow as an SMC twist, on the toy GPT-2 (V = 9).

Checked against brute-force enumeration: Z_hat unbiased for any policy; the flow formula
with sigma's exact stop probabilities is the optimal twist psi*; a short SubTB training
run gives a twist that lowers Var(log Z_hat) below untwisted SMC.

The task (GFN_T, GFN_PROMPT, GFN_PHI, gfn_config) and its exact target (gfn_target) are
conftest's, shared with test_gfn_trainer.py.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import GFN_PHI as PHI
from conftest import GFN_PROMPT as PROMPT
from conftest import GFN_T as T
from conftest import GFN_TARGETS as TARGETS
from conftest import gfn_config, perturbed_lora

import llmsample
from llmsample.diagnostics.exact import TOY_EOS, enumerate_target, toy_model, toy_tokenizer
from llmsample.gfn import BaseView, GFNConfig, GFNTrainer, add_lora
from llmsample.gfn.flow_twist import FlowTwist, flow_log_psi
from llmsample.hf.prompts import encode_prompts
from llmsample.particles import Particles


def _exact_stop(target):
    """Exact log p(STOP|prefix), log phi(prefix+STOP), log sigma(STOP|prefix) of every
    prefix of 1..T-1 non-stop tokens."""
    idx = target.index()
    lp, ls = {}, {}  # log p(prefix), log sigma(prefix) from the completions extending it
    for s, p, sg in zip(target.sequences, target.log_p.tolist(), target.log_sigma.tolist()):
        for k in range(1, len(s)):
            lp.setdefault(s[:k], []).append(p)
            ls.setdefault(s[:k], []).append(sg)
    out = {}
    for prefix in lp:
        i = idx[prefix + (TOY_EOS,)]
        log_p_pre = torch.tensor(lp[prefix], dtype=torch.float64).logsumexp(0)
        log_s_pre = torch.tensor(ls[prefix], dtype=torch.float64).logsumexp(0)
        out[prefix] = (
            float(target.log_p[i] - log_p_pre),
            float(target.log_phi[i]),
            float(target.log_sigma[i] - log_s_pre),
        )
    return out


def _drive(twist, tok, target_keys=None):
    """Drive ``twist`` like the engine over all prefixes of 1..T-1 non-stop tokens (one
    row each, branching by reorder) and return {prefix: log psi}."""
    batch = encode_prompts(tok, [PROMPT])
    V = 9
    words = torch.tensor([v for v in range(V) if v != TOY_EOS])
    twist.start(batch, len(words))
    tokens = words[:, None]  # [8, 1]
    out = {}
    for depth in range(1, T):
        R = tokens.shape[0]
        x = Particles(
            tokens,
            torch.full((R,), depth),
            torch.zeros(R, dtype=torch.long),
            batch,
            tok,
            torch.tensor([TOY_EOS]),
            T,
            V,
            torch.arange(R),
        )
        vals = twist.prefix(x)
        out.update({tuple(r): float(v) for r, v in zip(tokens.tolist(), vals)})
        if depth == T - 1:
            break
        # every row branches into all 8 words: row r -> rows 8r..8r+7
        index = torch.arange(R).repeat_interleave(len(words))
        twist.reorder(index)
        twist.advance(tokens[index, -1])
        tokens = torch.cat([tokens[index], words.repeat(R)[:, None]], dim=1)
    return out


def test_flow_formula_with_sigma_stop_is_the_optimal_twist(gfn_target):
    """log p(STOP|x) + log phi(x+STOP) - log sigma(STOP|x) = log psi*(x), to 1e-8."""
    stop = _exact_stop(gfn_target)
    assert len(stop) == 8 + 64
    prefixes = list(stop)
    a, b, c = (torch.tensor([stop[p][k] for p in prefixes], dtype=torch.float64) for k in range(3))
    got = flow_log_psi(a, b, c)
    want = torch.tensor([gfn_target.log_psi[p] for p in prefixes], dtype=torch.float64)
    assert torch.allclose(got, want, atol=1e-8, rtol=0), (got - want).abs().max()


def test_flow_twist_with_exact_sigma_stop_matches_psi_star(gfn_target):
    """FlowTwist end to end (its own base session and stop-extended phi) with q(STOP|.)
    replaced by sigma's: psi* on every prefix (fp32 model, cached vs uncached: 1e-4)."""
    stop = _exact_stop(gfn_target)
    tok = toy_tokenizer(with_pad=True)

    def sigma_stop(x):
        return torch.tensor([stop[tuple(r)][2] for r in x.tokens.tolist()], dtype=torch.float64)

    twist = FlowTwist(None, toy_model("gpt2"), PHI, TOY_EOS, log_q_stop=sigma_stop)
    got = _drive(twist, tok)
    err = max(abs(got[p] - gfn_target.log_psi[p]) for p in stop)
    assert set(got) == set(stop) and err < 1e-4, err


def test_prefix_on_a_subset_uses_row_numbers():
    """Asked about a subset of rows (out of order), each gets its own state row; a view
    without row numbers (not from the engine) is refused."""
    tok = toy_tokenizer(with_pad=True)
    policy = perturbed_lora(toy_model("gpt2"), TARGETS, std=0.1)
    batch = encode_prompts(tok, [PROMPT, "c d e"])
    first = torch.tensor([1, 1, 2, 1, 3, 3])  # 2 prompts x 3 rows
    second = torch.tensor([4, 5, 6, 7, 0, 2])

    def view(tokens, rows):
        R = len(rows)
        pi = torch.tensor([0, 0, 0, 1, 1, 1])[rows]
        return Particles(
            tokens[rows], torch.full((R,), 2), pi, batch, tok, torch.tensor([TOY_EOS]), T, 9, rows
        )

    tokens = torch.stack([first, second], dim=1)
    full = FlowTwist(policy, policy, PHI, TOY_EOS)
    full.start(batch, 3)
    full.advance(first)
    want = full.prefix(view(tokens, torch.arange(6)))
    sub = FlowTwist(policy, None, PHI, TOY_EOS)
    sub.start(batch, 3)
    sub.advance(first)
    rows = torch.tensor([1, 0, 5, 4])  # out of order, rows 0 and 1 share a prefix
    got = sub.prefix(view(tokens, rows))
    assert torch.allclose(got, want[rows], atol=1e-5), (got, want[rows])
    plain = view(tokens, rows)
    plain.rows = None
    with pytest.raises(RuntimeError, match="SMC engine"):
        full.prefix(plain)


def _smc(model, tok, runs, twist, N, seed):
    return llmsample.smc_generate(
        model,
        tok,
        [PROMPT] * runs,
        potential=PHI,
        twist=twist,
        num_particles=N,
        max_new_tokens=T,
        ess_threshold=2.0,
        seed=seed,
    )


def test_z_hat_unbiased_for_any_policy(gfn_target):
    """A random policy (q != sigma): Z_hat/Z has mean 1, for two prompts of different
    lengths in one batch (left padding; rows finish at different steps, so the engine
    asks about subsets and resamples every step)."""
    tok = toy_tokenizer(with_pad=True)
    model = toy_model("gpt2")
    prompts = [PROMPT, "c d e f"]
    targets = [gfn_target, enumerate_target(model, tok, prompts[1], PHI, T, TOY_EOS)]
    policy = perturbed_lora(model, TARGETS, std=0.3)
    twist = FlowTwist(policy, None, PHI, TOY_EOS)
    runs = 400
    out = llmsample.smc_generate(
        BaseView(policy),
        tok,
        [p for p in prompts for _ in range(runs)],
        potential=PHI,
        twist=twist,
        num_particles=4,
        max_new_tokens=T,
        ess_threshold=2.0,
        seed=3,
    )
    assert out.resampled.any()
    for b, tg in enumerate(targets):
        ratio = (out.log_z[b * runs : (b + 1) * runs] - tg.log_z).exp()
        se = ratio.std() / math.sqrt(runs)
        assert abs(ratio.mean() - 1) < 3 * se, (prompts[b], ratio.mean(), se)


def test_subtb_policy_flow_twist_lowers_log_z_variance(tmp_path, gfn_target):
    tok = toy_tokenizer(with_pad=True)
    cfg = gfn_config(tmp_path, loss="subtb", steps=80, log_every=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        policy = add_lora(toy_model("gpt2"), cfg)
    GFNTrainer(policy, tok, [PROMPT], PHI, cfg, stop_ids=[TOY_EOS]).train()
    policy.eval()
    base = BaseView(policy)
    stop = _exact_stop(gfn_target)

    def sigma_stop(x):  # q(STOP|.) = sigma's: the flow twist is then psi* (exact)
        return torch.tensor([stop[tuple(r)][2] for r in x.tokens.tolist()], dtype=torch.float64)

    # many seeds: Var(log Z_hat) from 40 runs is too noisy to compare (SE ~ 22%)
    runs, N = 600, 8
    flow = _smc(base, tok, runs, FlowTwist(policy, None, PHI, TOY_EOS), N, seed=0).log_z
    plain = _smc(base, tok, runs, "none", N, seed=0).log_z
    exact = FlowTwist(None, base, PHI, TOY_EOS, log_q_stop=sigma_stop)
    best = _smc(base, tok, runs, exact, N, seed=0).log_z
    var_flow, var_plain, var_best = float(flow.var()), float(plain.var()), float(best.var())
    got = _drive(FlowTwist(policy, None, PHI, TOY_EOS), tok)
    err = [abs(got[p] - gfn_target.log_psi[p]) for p in stop]
    print(
        f"\nVar(log Z_hat), N={N}, {runs} seeds: flow twist {var_flow:.4g}, no twist "
        f"{var_plain:.4g}, exact psi* {var_best:.4g} (first 40 seeds: {float(flow[:40].var()):.4g}"
        f", {float(plain[:40].var()):.4g}, {float(best[:40].var()):.4g}); "
        f"|log psi - log psi*| over {len(err)} prefixes: mean {sum(err) / len(err):.4f}, "
        f"max {max(err):.4f}"
    )
    assert var_flow < var_plain, (var_flow, var_plain)
    assert var_flow < 1.05 * var_best, (var_flow, var_best)  # about what psi* itself gives


def test_hard_constraint_is_refused():
    """phi(prefix + STOP) = 0 would make the flow twist 0 on live prefixes: an error."""
    from llmsample.potentials import Constraint

    model, tok = toy_model("gpt2"), toy_tokenizer(with_pad=True)
    policy = add_lora(model, GFNConfig(target_modules=["c_attn"]))
    hard = Constraint(lambda text: "c" in text.split(), name="has c")
    twist = FlowTwist(policy, None, hard, stop_token_id=TOY_EOS)
    with pytest.raises(ValueError, match="soft reward"):
        llmsample.smc_generate(
            BaseView(policy),
            tok,
            ["a b"],
            potential=hard,
            twist=twist,
            num_particles=8,
            max_new_tokens=3,
            eos_token_id=TOY_EOS,
            seed=0,
        )
