"""GFlowNet losses on enumerable problems: exactly zero at q = sigma, positive elsewhere.

The problems are random trees built here in pure torch (no transformers): a base
distribution p over V-1 tokens + EOS for at most T steps (a sequence of T tokens is
cut and complete), a random log phi on complete sequences, and sigma ∝ p phi, with
its exact per-step conditionals from the optimal twist psi*(prefix) = E_p[phi | prefix].
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from llmsample.gfn.losses import prefix_flows, subtrajectory_balance, trajectory_balance, vargrad

EOS = 0
V = 4
T = 3
F64 = torch.float64


class Tree:
    """Exact p, phi, sigma over every complete sequence of a random tree."""

    def __init__(self, seed: int):
        g = torch.Generator().manual_seed(seed)
        self._logits: dict[tuple[int, ...], torch.Tensor] = {}
        self.g = g
        self.seqs = [s for k in range(T + 1) for s in itertools.product(range(1, V), repeat=k)]
        self.seqs = [s + (EOS,) for s in self.seqs if len(s) < T] + [
            s for s in self.seqs if len(s) == T
        ]
        self.log_phi = {s: float(torch.randn((), generator=g, dtype=F64) * 2) for s in self.seqs}
        self.log_p = {s: self.logp_seq(s) for s in self.seqs}
        joint = torch.tensor([self.log_p[s] + self.log_phi[s] for s in self.seqs], dtype=F64)
        self.log_z = float(joint.logsumexp(0))

    def next_logp(self, prefix: tuple[int, ...]) -> torch.Tensor:
        if prefix not in self._logits:
            self._logits[prefix] = torch.randn(V, generator=self.g, dtype=F64).log_softmax(0)
        return self._logits[prefix]

    def logp_seq(self, s: tuple[int, ...]) -> float:
        return sum(float(self.next_logp(s[:t])[s[t]]) for t in range(len(s)))

    def log_psi(self, prefix: tuple[int, ...]) -> float:
        """log sum_{x extends prefix} p(x|prefix) phi(x) (prefix non-terminal)."""
        vals = [
            self.log_p[s] - self.logp_seq(prefix) + self.log_phi[s]
            for s in self.seqs
            if s[: len(prefix)] == prefix and len(s) > len(prefix)
        ]
        return float(torch.tensor(vals, dtype=F64).logsumexp(0))

    def log_sigma_step(self, prefix: tuple[int, ...], tok: int) -> float:
        """log sigma(tok | prefix)."""
        nxt = prefix + (tok,)
        done = tok == EOS or len(nxt) == T
        value = self.log_phi[nxt] if done else self.log_psi(nxt)
        return float(self.next_logp(prefix)[tok]) + value - self.log_psi(prefix)

    def log_sigma(self, s: tuple[int, ...]) -> float:
        return self.log_p[s] + self.log_phi[s] - self.log_z


@pytest.fixture(params=[0, 1, 2])
def tree(request) -> Tree:
    return Tree(request.param)


def _subtb_terms(tree: Tree, seqs, log_q_step):
    """Per-row tensors of modified SubTB for complete sequences under step policy q."""
    N = len(seqs)
    q_tok = torch.zeros(N, T, dtype=F64)
    q_stop = torch.zeros(N, T + 1, dtype=F64)
    r_stop = torch.zeros(N, T + 1, dtype=F64)
    mask = torch.zeros(N, T + 1, dtype=torch.bool)
    for r, s in enumerate(seqs):
        body = s[:-1] if s[-1] == EOS else s  # the non-terminal tokens
        for i in range(len(body) + 1):
            mask[r, i] = True
            prefix = body[:i]
            if i < T:  # stopping right after x_1:i is an EOS step
                stopped = prefix + (EOS,)
                q_stop[r, i] = log_q_step(prefix, EOS)
                r_stop[r, i] = tree.log_p[stopped] + tree.log_phi[stopped]
            else:  # cut at T: forced stop, log q = 0
                r_stop[r, i] = tree.log_p[body] + tree.log_phi[body]
            if i < len(body):
                q_tok[r, i] = log_q_step(prefix, body[i])
    return q_tok, q_stop, r_stop, mask


def test_sigma_is_normalized(tree):
    total = torch.tensor([tree.log_sigma(s) for s in tree.seqs], dtype=F64).logsumexp(0)
    assert abs(float(total)) < 1e-12
    # the step conditionals multiply out to sigma: the test's own ground truth
    for s in tree.seqs[:20]:
        steps = sum(tree.log_sigma_step(s[:t], s[t]) for t in range(len(s)))
        assert steps == pytest.approx(tree.log_sigma(s), abs=1e-10)


def test_tb_and_vargrad_are_zero_at_sigma(tree):
    log_q = torch.tensor([[tree.log_sigma(s) for s in tree.seqs]], dtype=F64)  # [1, S]
    log_r = torch.tensor([[tree.log_p[s] + tree.log_phi[s] for s in tree.seqs]], dtype=F64)
    assert float(trajectory_balance(log_q, log_r, torch.tensor(tree.log_z, dtype=F64))) < 1e-20
    loss, lz = vargrad(log_q, log_r)
    assert float(loss) < 1e-20 and float(lz[0]) == pytest.approx(tree.log_z, abs=1e-10)
    # prompt-conditioned log Z: one value per prompt row
    two = torch.cat([log_q, log_q]), torch.cat([log_r, log_r])
    assert float(trajectory_balance(*two, torch.full((2,), tree.log_z, dtype=F64))) < 1e-20


def test_tb_and_vargrad_positive_away_from_sigma(tree):
    log_r = torch.tensor([[tree.log_p[s] + tree.log_phi[s] for s in tree.seqs]], dtype=F64)
    log_p = torch.tensor([[tree.log_p[s] for s in tree.seqs]], dtype=F64)  # q = p != sigma
    assert float(vargrad(log_p, log_r)[0]) > 1e-3
    wrong_z = torch.tensor(tree.log_z + 0.5, dtype=F64)
    log_sigma = log_r - tree.log_z
    assert float(trajectory_balance(log_sigma, log_r, wrong_z)) == pytest.approx(0.25)


def test_tb_gradients(tree):
    """d/d log Z of TB at the optimum is 0; with log Z off by e, it is 2e."""
    log_r = torch.tensor([[tree.log_p[s] + tree.log_phi[s] for s in tree.seqs]], dtype=F64)
    for err in (0.0, 0.3):
        lz = torch.tensor(tree.log_z + err, dtype=F64, requires_grad=True)
        trajectory_balance(log_r - tree.log_z, log_r, lz).backward()
        assert float(lz.grad) == pytest.approx(2 * err, abs=1e-10)


def test_vargrad_needs_two_samples():
    with pytest.raises(ValueError, match="K >= 2"):
        vargrad(torch.zeros(3, 1), torch.zeros(3, 1))


def test_subtb_is_zero_at_sigma_and_flows_equal_log_z(tree):
    q_tok, q_stop, r_stop, mask = _subtb_terms(tree, tree.seqs, tree.log_sigma_step)
    assert float(subtrajectory_balance(q_tok, q_stop, r_stop, mask)) < 1e-20
    assert float(subtrajectory_balance(q_tok, q_stop, r_stop, mask, lam=0.5)) < 1e-20
    u = prefix_flows(q_tok, q_stop, r_stop)
    assert torch.allclose(u[mask], torch.full_like(u[mask], tree.log_z), atol=1e-10)


def test_subtb_positive_at_base_policy(tree):
    def base(prefix, tok):
        return float(tree.next_logp(prefix)[tok])

    q_tok, q_stop, r_stop, mask = _subtb_terms(tree, tree.seqs, base)
    assert float(subtrajectory_balance(q_tok, q_stop, r_stop, mask)) > 1e-3


def test_subtb_ignores_masked_positions(tree):
    q_tok, q_stop, r_stop, mask = _subtb_terms(tree, tree.seqs, tree.log_sigma_step)
    junk = ~mask
    r_stop = torch.where(junk, torch.full_like(r_stop, 1e3), r_stop)
    q_stop = torch.where(junk, torch.full_like(q_stop, -7.0), q_stop)
    assert float(subtrajectory_balance(q_tok, q_stop, r_stop, mask)) < 1e-20
    assert math.isfinite(float(subtrajectory_balance(q_tok[:1], q_stop[:1], r_stop[:1], mask[:1])))
