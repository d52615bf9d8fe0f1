"""A GFlowNet policy's implied state flow as an SMC twist.

A policy q trained with modified sub-trajectory balance (:func:`~llmsample.gfn.losses.
subtrajectory_balance`) implies a flow for every prefix x_<=t,

    log F(x_<=t) = log R(x_<=t, STOP) - log q(STOP | x_<=t),   R(x) = p(x|c) phi(x,c),

and at the optimum F(x_<=t) = sum over completions of R = p(x_<=t|c) psi*(x_<=t) with
psi*(x_<=t) = E_p[phi | x_<=t] the optimal twist. The twist psi_t = F / p(x_<=t|c) is

    log psi_t(x_<=t) = log p(STOP | x_<=t) + log phi(x_<=t + STOP) - log q(STOP | x_<=t)

(:func:`flow_log_psi`; the p(x_<=t|c) factors cancel). It equals psi* exactly when q's
stop probabilities are sigma's: sigma(STOP | x_<=t) = p(STOP | x_<=t) phi(x_<=t + STOP)
/ psi*(x_<=t). For any other q it is still a valid twist (SMC weights telescope, the
potential replaces psi at completion), so Z_hat stays unbiased; q only sets the variance.

    twist = FlowTwist(policy, None, stop_token_id=eos)  # base: BaseView(policy)
    out = smc_generate(BaseView(policy), tok, prompts, potential=potential, twist=twist)

**Caveat.** Where phi(x_<=t + STOP) = 0 (a hard constraint the prefix does not yet meet)
the formula gives psi = 0 although completions may still satisfy it: such prefixes would
be killed and SMC biased, so ``prefix`` raises instead. Use it with potentials that are
positive on every stopped prefix (soft rewards), as modified SubTB itself requires.

**State and cost.** Two KV-cached incremental passes (policy with its adapter, and the
base model): two extra decoding forwards per step. ``prefix`` needs the stop
probabilities *after* the token just drawn, so it steps both sessions on the spot and
``advance`` then runs nothing. The engine asks about a subset of rows (the running ones,
``Particles.rows``); the other rows are stepped with the stop token: they have finished
and are never asked again (resampling only moves running rows onto running rows).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from llmsample.hf.adapters import BaseView, shares_base
from llmsample.hf.prompts import PromptBatch
from llmsample.hf.session import LMSession
from llmsample.particles import Particles
from llmsample.potentials.base import Potential
from llmsample.twists import RUN_POTENTIAL, PotentialReader

__all__ = ["FlowTwist", "flow_log_psi"]


def flow_log_psi(log_p_stop: Tensor, log_phi_stop: Tensor, log_q_stop: Tensor) -> Tensor:
    """log psi = log p(STOP|x) + log phi(x + STOP) - log q(STOP|x), elementwise, float64."""
    out = log_p_stop.double() + log_phi_stop.double() - log_q_stop.double()
    return torch.where(torch.isneginf(log_phi_stop.double()), -torch.inf, out)


class FlowTwist(PotentialReader):
    """The flow of a (SubTB-trained) policy as a twist for SMC on the base model.

    ``policy``: the policy q (e.g. a peft LoRA model, run with its adapter on).
    ``base_model``: the SMC run's base model p; None, the policy itself or the model it
    wraps means ``BaseView(policy)`` (adapter disabled). ``potential``: leave it out
    and the SMC run hands over its own (:class:`PotentialReader`; None: phi = 1).
    ``stop_token_id`` (required): the stop token the policy was trained with, one of the
    run's EOS ids. ``log_q_stop``: optional callable replacing the
    policy's log q(STOP | prefix): ``fn(x: Particles) -> [r]`` on the queried prefixes
    (e.g. exact sigma conditionals); the policy then need not be given.
    """

    informative = True

    def __init__(
        self,
        policy,
        base_model,
        potential: Potential | None | str = RUN_POTENTIAL,
        stop_token_id: int | None = None,
        *,
        log_q_stop: Callable[[Particles], Tensor] | None = None,
    ):
        if policy is None and log_q_stop is None:
            raise ValueError("FlowTwist needs a policy or a log_q_stop callable")
        if base_model is None or (policy is not None and shares_base(policy, base_model)):
            if policy is None:
                raise ValueError("FlowTwist needs a base_model when no policy is given")
            base_model = BaseView(policy)
        if stop_token_id is None:
            raise ValueError("FlowTwist needs stop_token_id (the stop token the policy learned)")
        super().__init__(potential)
        self.policy, self.base_model = policy, base_model
        self.stop = int(stop_token_id)
        self.log_q_stop = log_q_stop
        self.q_session: LMSession | None = None
        self.p_session: LMSession | None = None

    @property
    def forward_tokens(self) -> int:
        return sum(s.forward_tokens for s in (self.q_session, self.p_session) if s is not None)

    def start(self, prompts: PromptBatch, num_particles: int) -> None:
        self.p_session = LMSession(self.base_model, prompts, num_particles)
        self.q_session = None
        if self.policy is not None and self.log_q_stop is None:
            self.q_session = LMSession(self.policy, prompts, num_particles)
        self.step = 0
        self.asked: Tensor | None = None  # rows prefix() stepped with their token

    def _sessions(self):
        return [s for s in (self.p_session, self.q_session) if s is not None]

    def advance(self, tokens: Tensor) -> None:
        if self.asked is None:  # prefix() was not called: step with every row's token
            for s in self._sessions():
                s.step(tokens.to(self.p_session.device))
        self.asked = None
        self.step += 1

    def reorder(self, index: Tensor) -> None:
        index = index.to(self.p_session.device)
        for s in self._sessions():
            s.reorder(index)
        if self.asked is not None:
            self.asked = self.asked[index]

    def _rows(self, x: Particles) -> Tensor:
        """State rows of the rows of ``x`` (whose last token is the one just drawn),
        stepping the sessions with those tokens first if not done yet at this step."""
        if self.p_session is None or x.rows is None:
            raise RuntimeError(
                "FlowTwist keeps per-row state: it must be driven by the SMC engine "
                "(smc_generate / run_smc), whose Particles carry their row numbers"
            )
        if x.step != self.step + 1:
            raise RuntimeError(
                f"FlowTwist is at step {self.step} but was asked about prefixes of length {x.step}"
            )
        dev = self.p_session.device
        rows = x.rows.to(dev)
        if self.asked is None:
            R = self.p_session.logp.shape[0]
            pending = torch.full((R,), self.stop, dtype=torch.long, device=dev)
            pending[rows] = x.tokens[:, -1].to(dev)
            for s in self._sessions():
                s.step(pending)
            self.asked = torch.zeros(R, dtype=torch.bool, device=dev)
            self.asked[rows] = True
        elif not bool(self.asked[rows].all()):
            raise RuntimeError("FlowTwist was asked about new rows twice in one step")
        return rows

    def _stopped(self, x: Particles) -> Particles:
        """The rows of ``x`` (incomplete, no padding) with the stop token appended."""
        stop = torch.full((x.num_rows, 1), self.stop, dtype=torch.long, device=x.device)
        return Particles(
            torch.cat([x.tokens, stop], dim=1),
            x.lengths + 1,
            x.prompt_index,
            x.prompts,
            x.tokenizer,
            x.eos_token_ids,
            max(x.max_new_tokens, x.step + 1),
            x.vocab_size,
        )

    def prefix(self, x: Particles) -> Tensor:
        if x.num_rows == 0:
            return torch.zeros(0, dtype=torch.float64, device=x.device)
        if x.eos_token_ids.numel() and not bool((x.eos_token_ids == self.stop).any()):
            raise ValueError(
                f"FlowTwist's stop token {self.stop} is not one of the run's EOS ids "
                f"{x.eos_token_ids.tolist()}"
            )
        rows = self._rows(x)
        log_p_stop = self.p_session.logp[rows, self.stop].to(x.device)
        if self.log_q_stop is not None:
            log_q_stop = torch.as_tensor(self.log_q_stop(x), device=x.device)
        else:
            log_q_stop = self.q_session.logp[rows, self.stop].to(x.device)
        if self.potential is None:
            log_phi = torch.zeros(x.num_rows, dtype=torch.float64, device=x.device)
        else:
            log_phi = self.potential.complete(self._stopped(x)).to(x.device)
        out = flow_log_psi(log_p_stop, log_phi, log_q_stop)
        if bool(torch.isneginf(out).any()):
            raise ValueError(
                "FlowTwist: phi(prefix + stop) = 0 for a running prefix, so its flow twist "
                "is 0 and SMC would kill a prefix that may still complete (a biased run); "
                "use a potential that is positive on every stopped prefix (a soft reward)"
            )
        return out
