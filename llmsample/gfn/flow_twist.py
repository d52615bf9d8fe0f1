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

    twist = FlowTwist(policy, None, potential, stop_token_id=eos)  # base: BaseView(policy)
    out = smc_generate(BaseView(policy), tok, prompts, potential=potential, twist=twist)

**Caveat.** Where phi(x_<=t + STOP) = 0 (a hard constraint the prefix does not yet meet)
the formula gives psi = 0 although completions may still satisfy it: such prefixes would
be killed and SMC biased, so ``prefix`` raises instead. Use it with potentials that are
positive on every stopped prefix (soft rewards), as modified SubTB itself requires.

**State and cost.** Two KV-cached incremental passes (policy with its adapter, and the
base model): two extra decoding forwards per step. ``prefix`` needs the stop
probabilities *after* the token just drawn, so it steps both sessions on the spot and
``advance`` then runs nothing. The engine asks about a subset of rows (the running ones)
without their row numbers: each is matched by content (prompt, tokens) to a distinct
state row holding its prefix, and that row is stepped with its new token (rows not asked
about get the stop token). Equal prefixes are interchangeable, so the match need not be
the row's own; ``reorder`` (resampling, between ``prefix`` and ``advance``) is therefore
deferred, and ``advance``, which gets every row's token, gives each row a state row
holding its (prefix, token), by content again. The scores are a function of content
alone, so this is exact; rows nobody holds (finished ones) get any state row.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from llmsample.gfn.reward import BaseView
from llmsample.lm import LMSession, PromptBatch
from llmsample.particles import Particles
from llmsample.potentials import Potential
from llmsample.twists import Twist

__all__ = ["FlowTwist", "flow_log_psi"]


def flow_log_psi(log_p_stop: Tensor, log_phi_stop: Tensor, log_q_stop: Tensor) -> Tensor:
    """log psi = log p(STOP|x) + log phi(x + STOP) - log q(STOP|x), elementwise, float64."""
    out = log_p_stop.double() + log_phi_stop.double() - log_q_stop.double()
    return torch.where(torch.isneginf(log_phi_stop.double()), -torch.inf, out)


def _match_rows_1to1(query: Tensor, keys: Tensor) -> Tensor:
    """For each row of ``query`` [r, k] a distinct row of ``keys`` [R, k] equal to it:
    equal rows are paired in order (the i-th such query row gets the i-th such key)."""
    R, r = keys.shape[0], query.shape[0]
    dev = keys.device
    _, inv = torch.unique(torch.cat([keys, query]), dim=0, return_inverse=True)

    def ranks(g: Tensor) -> Tensor:  # occurrence number of each element within its group
        order = torch.sort(g, stable=True).indices
        sg = g[order]
        first = torch.searchsorted(sg, sg, side="left")
        rank = torch.empty_like(g)
        rank[order] = torch.arange(g.shape[0], device=dev) - first
        return rank

    gk, gq = inv[:R], inv[R:]
    code_k = gk * (R + r + 1) + ranks(gk)
    code_q = gq * (R + r + 1) + ranks(gq)
    sk, order = torch.sort(code_k)
    pos = torch.searchsorted(sk, code_q).clamp(max=max(R - 1, 0))
    if R == 0 or not bool((sk[pos] == code_q).all()):
        raise RuntimeError(
            "FlowTwist was asked about a prefix it has no state for; it must be driven by "
            "the SMC engine (start/advance/reorder) on the same rows"
        )
    return order[pos]


def _match_rows_any(query: Tensor, keys: Tensor) -> Tensor:
    """For each row of ``query`` [r, k] some row of ``keys`` [R, k] equal to it, or -1."""
    R = keys.shape[0]
    _, inv = torch.unique(torch.cat([keys, query]), dim=0, return_inverse=True)
    rep = torch.full((int(inv.max()) + 1,), -1, dtype=torch.long, device=keys.device)
    rep.scatter_reduce_(0, inv[:R], torch.arange(R, device=keys.device), reduce="amax")
    return rep[inv[R:]]


def _is_peft_of(policy, model) -> bool:
    if not hasattr(policy, "disable_adapter"):
        return False
    inner = [policy]
    for name in ("base_model", "get_base_model"):
        obj = getattr(policy, name, None)
        if obj is not None:
            inner.append(obj() if callable(obj) and name.startswith("get_") else obj)
    base = getattr(policy, "base_model", None)
    if base is not None and hasattr(base, "model"):
        inner.append(base.model)
    return any(model is m for m in inner)


class FlowTwist(Twist):
    """The flow of a (SubTB-trained) policy as a twist for SMC on the base model.

    ``policy``: the policy q (e.g. a peft LoRA model, run with its adapter on).
    ``base_model``: the SMC run's base model p; None, the policy itself or the model it
    wraps means ``BaseView(policy)`` (adapter disabled). ``potential``: the SMC run's
    potential (None: phi = 1). ``stop_token_id``: the stop token the policy was trained
    with, one of the run's EOS ids. ``log_q_stop``: optional callable replacing the
    policy's log q(STOP | prefix): ``fn(x: Particles) -> [r]`` on the queried prefixes
    (e.g. exact sigma conditionals); the policy then need not be given.
    """

    informative = True

    def __init__(
        self,
        policy,
        base_model,
        potential: Potential | None,
        stop_token_id: int,
        *,
        log_q_stop: Callable[[Particles], Tensor] | None = None,
    ):
        if policy is None and log_q_stop is None:
            raise ValueError("FlowTwist needs a policy or a log_q_stop callable")
        if base_model is None or (policy is not None and _is_peft_of(policy, base_model)):
            if policy is None:
                raise ValueError("FlowTwist needs a base_model when no policy is given")
            base_model = BaseView(policy)
        self.policy, self.base_model, self.potential = policy, base_model, potential
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
        dev = self.p_session.device
        self.prompt_index = torch.arange(prompts.size, device=dev).repeat_interleave(num_particles)
        self.tokens = torch.zeros(self.prompt_index.shape[0], 0, dtype=torch.long, device=dev)
        # set by prefix(), which steps the sessions: the (prompt, tokens) each session row
        # holds, [R, 1 + t + 1], until advance() re-maps the rows
        self.held: Tensor | None = None

    def _sessions(self):
        return [s for s in (self.p_session, self.q_session) if s is not None]

    def _step(self, tokens: Tensor) -> None:
        for s in self._sessions():
            s.step(tokens)

    def advance(self, tokens: Tensor) -> None:
        tokens = tokens.to(self.p_session.device)
        if self.held is None:
            self._step(tokens)
            self.tokens = torch.cat([self.tokens, tokens[:, None]], dim=1)
            return
        # prefix() already stepped the sessions, on rows matched by content only (equal
        # prefixes are interchangeable, and the rows it was not asked about are unknown),
        # and reorder() has not moved them since. Now each row's content is known: give it
        # a state row that holds it (rows nobody holds, i.e. rows that have finished and
        # are never scored again, get any); the keys record what each row holds.
        want = torch.cat([self.prompt_index[:, None], self.tokens, tokens[:, None]], dim=1)
        held, self.held = self.held, None
        if not torch.equal(held, want):
            rows = _match_rows_any(want, held).clamp(min=0)
            for s in self._sessions():
                s.reorder(rows)
            held = held[rows]
        self.prompt_index, self.tokens = held[:, 0], held[:, 1:]

    def reorder(self, index: Tensor) -> None:
        index = index.to(self.p_session.device)
        if self.held is None:  # (between prefix() and advance(), advance re-maps the rows)
            for s in self._sessions():
                s.reorder(index)
        self.tokens = self.tokens[index]
        self.prompt_index = self.prompt_index[index]

    def _rows(self, x: Particles) -> Tensor:
        """State rows of the rows of ``x`` (whose last token is the one just drawn),
        stepping the sessions with those tokens first if not done yet."""
        dev = self.p_session.device
        tok, pi = x.tokens.to(dev), x.prompt_index.to(dev)
        t = self.tokens.shape[1]
        if tok.shape[1] != t + 1:
            raise RuntimeError(
                f"FlowTwist is at step {t} but was asked about prefixes of length {tok.shape[1]}"
            )
        query = torch.cat([pi[:, None], tok], dim=1)
        if self.held is not None:  # asked again at the same step
            return _match_rows_1to1(query, self.held)
        keys = torch.cat([self.prompt_index[:, None], self.tokens], dim=1)
        R = keys.shape[0]
        if query.shape[0] == R and torch.equal(query[:, :-1], keys):
            rows = torch.arange(R, device=dev)
        else:
            rows = _match_rows_1to1(query[:, :-1], keys)
        pending = torch.full((R,), self.stop, dtype=torch.long, device=dev)
        pending[rows] = tok[:, -1]
        self._step(pending)
        self.held = torch.cat([keys, pending[:, None]], dim=1)  # what the sessions hold
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
