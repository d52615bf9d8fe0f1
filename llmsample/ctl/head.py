"""A learned twist: a small head on the frozen base LM's last hidden state.

From the base model's last-layer state h(c, x_<t) after the prompt c and the tokens
x_<t, the head gives log psi of *every* one-token extension at once:

    s(x_<t) = head(h(c, x_<t))            # [V]
    log psi_t(x_<=t) = s(x_<t)[x_t]       # the prefix score is a gather

so one forward gives both the score of the token just drawn (``Twist.prefix``) and the
scores of all next tokens (``Twist.next_token``, which enables the locally optimal
proposal q ∝ p·psi). The last layer starts at zero: log psi = 0 everywhere, i.e. plain
SMC, until trained (``llmsample.ctl``).

**Conditional heads.** When the target depends on more than the prompt (infilling: the
suffix lives in the potential, not in the prompt the LM reads), a head built with
``cond_size=C`` also reads a per-prompt vector, ``head(h, cond)``; ``LearnedTwist(...,
condition=[B, C])`` gives row r the vector of its prompt. :func:`text_features` makes one
from text (the base model's mean last hidden state over it), so one head serves every
suffix (amortized over problems, as in Zhao et al. 2024).

    head = TwistHead(model.config.hidden_size, vocab_size(model))
    twist = LearnedTwist(model, head)  # phi: the run's potential, handed over at bind
    out = smc_generate(model, tok, prompts, potential=potential, twist=twist)
    out = smc_generate(..., twist=twist, proposal="optimal")     # q ∝ p·psi

    head = TwistHead(H, V, cond_size=H)                           # infilling: read the suffix
    twist = LearnedTwist(model, head, condition=text_features(model, tok, suffixes))

**Exact weights for any head.** The engine telescopes psi: a row's weight gains
log psi_t - log psi_{t-1} per step, and at completion (EOS, or the T-th token) the
potential phi replaces psi. The head's values only ever enter through that telescope,
so the final weights are p·phi/q whatever its parameters (tested with random heads).
``next_token`` follows the engine's contract: columns whose extension completes the
sequence (EOS tokens; every token at the last step) carry log phi, not the head. For
that it needs the *same* potential as the SMC run; it uses the potential's
``token_scores`` when it has them and otherwise calls ``complete`` on the R·|EOS|
one-token EOS extensions (and on all R·V extensions at the last step).

**State and cost.** The twist keeps its own KV-cached pass over the base model
(``output_hidden_states``) with a per-row hidden state [R, H], stepped in ``advance``
and permuted in ``reorder`` exactly like the engine's cache: the base model runs a
second time per step (twice the decoding FLOPs; no O(T^2) re-encoding). The engine
calls ``prefix`` on a subset of rows (the running ones); ``Particles.rows`` gives their
state rows.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from llmsample.hf.prompts import PromptBatch, encode_prompts
from llmsample.hf.session import LMSession, full_forward, model_device
from llmsample.particles import Particles
from llmsample.potentials.base import Potential
from llmsample.twists import RUN_POTENTIAL, PotentialReader

__all__ = ["TwistHead", "LearnedTwist", "text_features"]


class TwistHead(nn.Module):
    """log psi(x_<t, v) for all v from the hidden state after x_<t: [..., H] -> [..., V].

    A non-affine LayerNorm, then a linear map (``width=0``) or a one-hidden-layer GELU
    MLP of ``width`` units. With ``cond_size=C`` it reads [LayerNorm(h), LayerNorm(cond)]
    (``cond`` [..., C], e.g. :func:`text_features` of an infilling suffix). The output
    is V scores, or (``TwistHead.tied(model)``, ``embed_dim=E``) an E-vector dotted with
    the LM's frozen output embeddings, plus a bias per token. The output layer is
    zero-initialized: log psi = 0 (plain SMC).
    """

    def __init__(
        self,
        hidden_size: int,
        vocab_size: int,
        width: int = 128,
        cond_size: int = 0,
        embed_dim: int = 0,
    ):
        super().__init__()
        if hidden_size < 1 or vocab_size < 1 or min(width, cond_size, embed_dim) < 0:
            raise ValueError(
                f"TwistHead needs hidden_size, vocab_size >= 1 and width, cond_size, embed_dim "
                f">= 0, got {hidden_size}, {vocab_size}, {width}, {cond_size}, {embed_dim}"
            )
        self.config = dict(hidden_size=hidden_size, vocab_size=vocab_size, width=width)
        # (only stored when used: heads saved before these existed still load)
        self.config |= {
            k: v for k, v in dict(cond_size=cond_size, embed_dim=embed_dim).items() if v
        }
        self.cond_size, self.embed_dim = cond_size, embed_dim
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False)
        self.cond_norm = nn.LayerNorm(cond_size, elementwise_affine=False) if cond_size else None
        layers: list[nn.Module] = []
        inputs = hidden_size + cond_size
        if width:
            layers += [nn.Linear(inputs, width), nn.GELU()]
        out = nn.Linear(width or inputs, embed_dim or vocab_size)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        self.net = nn.Sequential(*layers, out)
        if embed_dim:  # scores = net(x) . e_v + b_v over frozen token embeddings e_v
            self.register_buffer("embeddings", torch.zeros(vocab_size, embed_dim))
            self.token_bias = nn.Parameter(torch.zeros(vocab_size))

    @classmethod
    def tied(cls, model, width: int = 128, cond_size: int = 0) -> TwistHead:
        """A head whose V scores are dot products with ``model``'s (frozen) output token
        embeddings plus a bias per token: far fewer parameters than a V-way output layer,
        and tokens the LM treats alike get alike scores (a sample-efficient head)."""
        emb = model.get_output_embeddings().weight.detach().float().cpu()  # [V, E]
        head = cls(model.config.hidden_size, emb.shape[0], width, cond_size, emb.shape[1])
        head.embeddings.copy_(emb)
        return head

    def forward(self, hidden: Tensor, cond: Tensor | None = None) -> Tensor:
        x = self.norm(hidden.float())
        if self.cond_size:
            if cond is None or cond.shape[-1] != self.cond_size:
                got = None if cond is None else tuple(cond.shape)
                raise ValueError(
                    f"this TwistHead reads a condition of size {self.cond_size} (cond_size); "
                    f"got cond {got}: pass one vector per row, e.g. LearnedTwist(..., "
                    f"condition=text_features(model, tokenizer, suffixes))"
                )
            c = self.cond_norm(cond.float().to(x.device)).expand(*x.shape[:-1], self.cond_size)
            x = torch.cat([x, c], dim=-1)
        elif cond is not None:
            raise ValueError("this TwistHead has cond_size=0 but was given a condition")
        if self.embed_dim:
            return self.net(x) @ self.embeddings.T + self.token_bias
        return self.net(x)

    def save(self, path: str | Path) -> None:
        torch.save({"config": self.config, "state_dict": self.state_dict()}, path)

    @classmethod
    def load(cls, path: str | Path, map_location=None) -> TwistHead:
        blob = torch.load(path, map_location=map_location, weights_only=True)
        head = cls(**blob["config"])
        head.load_state_dict(blob["state_dict"])
        return head


@torch.no_grad()
def text_features(model, tokenizer, texts: list[str], batch_size: int = 64) -> Tensor:
    """[B, H] float32: the mean of ``model``'s last-layer hidden states over each text's
    tokens (read on its own, no prompt): a fixed summary a conditional
    :class:`TwistHead` reads, e.g. of an infilling suffix."""
    if not texts or any(not isinstance(t, str) or not t for t in texts):
        raise ValueError("text_features needs a non-empty list of non-empty strings")
    device = model_device(model)
    out = []
    for i in range(0, len(texts), batch_size):
        batch = encode_prompts(tokenizer, texts[i : i + batch_size])
        ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
        _, h = full_forward(model, ids, mask, hidden=True)  # [b, L, H]
        m = mask[..., None].to(h.dtype)
        out.append(((h * m).sum(1) / m.sum(1)).float().cpu())
    return torch.cat(out)


class LearnedTwist(PotentialReader):
    """A :class:`TwistHead` on ``model`` (the frozen base LM of the SMC run) as a twist.

    ``next_token`` puts the SMC run's log phi on completing extensions: leave
    ``potential`` out and the run hands it over (:class:`PotentialReader`); one given here
    must be the run's own. ``prefix`` needs no potential.
    ``condition`` [B, C]: one vector per prompt of the run, for a head with ``cond_size=C``.
    ``exact_last_step=False``: at the last step, where every token completes a row,
    ``next_token`` returns None instead of calling ``potential.complete`` on all R·V
    extensions (a potential without token scores, e.g. a suffix likelihood), and the
    locally optimal proposal draws that token from p (weights stay exact).
    """

    informative = True

    def __init__(
        self,
        model,
        head: TwistHead,
        potential: Potential | None | str = RUN_POTENTIAL,
        condition: Tensor | None = None,
        exact_last_step: bool = True,
    ):
        super().__init__(potential)
        self.exact_last_step = exact_last_step
        cond_size = getattr(head, "cond_size", 0)
        if bool(cond_size) != (condition is not None):
            raise ValueError(
                f"the head has cond_size={cond_size} but condition is "
                f"{'given' if condition is not None else 'None'}: a conditional head needs "
                f"condition=[B, {cond_size}] (one vector per prompt), a plain head none"
            )
        if condition is not None and (condition.dim() != 2 or condition.shape[1] != cond_size):
            raise ValueError(f"condition must be [B, {cond_size}], got {tuple(condition.shape)}")
        self.model, self.head = model, head
        self.condition = condition
        self.session: LMSession | None = None
        self._scores: Tensor | None = None

    @property
    def forward_tokens(self) -> int:
        return 0 if self.session is None else self.session.forward_tokens

    def start(self, prompts: PromptBatch, num_particles: int) -> None:
        if self.condition is not None and self.condition.shape[0] != prompts.size:
            raise ValueError(
                f"condition has {self.condition.shape[0]} rows for {prompts.size} prompts"
            )
        self.session = LMSession(self.model, prompts, num_particles, hidden=True)
        dev = self.session.device
        self.prompt_index = torch.arange(prompts.size, device=dev).repeat_interleave(num_particles)
        self.step = 0
        self._scores = None

    def advance(self, tokens: Tensor) -> None:
        self.session.step(tokens.to(self.session.device))
        self.step += 1
        self._scores = None

    def reorder(self, index: Tensor) -> None:
        index = index.to(self.session.device)
        self.session.reorder(index)
        self.prompt_index = self.prompt_index[index]
        if self._scores is not None:
            self._scores = self._scores[index]

    @property
    def scores(self) -> Tensor:
        """[R, V] float64: the head's log psi of every one-token extension of each row."""
        if self._scores is None:
            head_device = model_device(self.head)
            cond = None
            if self.condition is not None:
                cond = self.condition.to(head_device)[self.prompt_index.to(head_device)]
            with torch.inference_mode():
                s = self.head(self.session.hidden.to(head_device), cond)
            self._scores = s.to(device=self.session.device, dtype=torch.float64)
        return self._scores

    def _rows(self, x: Particles, prefix_length: int) -> Tensor:
        """State rows of the rows of ``x``, whose first ``prefix_length`` tokens the state
        has read."""
        if self.session is None or x.rows is None:
            raise RuntimeError(
                "LearnedTwist keeps per-row state: it must be driven by the SMC engine "
                "(smc_generate / run_smc), whose Particles carry their row numbers"
            )
        if prefix_length != self.step:
            raise RuntimeError(
                f"LearnedTwist is at step {self.step} but was asked about prefixes of "
                f"length {prefix_length}"
            )
        return x.rows.to(self.session.device)

    def prefix(self, x: Particles) -> Tensor:
        rows = self._rows(x, x.step - 1)
        last = x.tokens[:, -1:].to(self.session.device)
        return self.scores[rows].gather(1, last)[:, 0].to(x.device)

    def next_token(self, x: Particles) -> Tensor | None:
        out = self.scores[self._rows(x, x.step)].to(x.device).clone()  # [R, V]
        t, T, V = x.step, x.max_new_tokens, x.vocab_size
        active = x.lengths == t  # rows still running (finished rows' scores are unused)
        if not bool(active.any()):
            return out
        last = t == T - 1
        eos = x.eos_token_ids.to(x.device)
        if self.potential is None:
            phi = torch.zeros(x.num_rows, V, dtype=torch.float64, device=x.device)
        else:
            phi = self.potential.token_scores(x)
            if phi is None and last and not self.exact_last_step:
                return None  # the proposal draws the last token from p
            if phi is None:
                phi = self._complete_scores(x, active, eos, last)
            phi = phi.to(device=x.device, dtype=torch.float64)
        cols = (
            torch.ones(V, dtype=torch.bool, device=x.device)
            if last
            else torch.isin(torch.arange(V, device=x.device), eos)
        )
        where = active[:, None] & cols[None, :]
        return torch.where(where, phi, out)

    def _complete_scores(self, x: Particles, active: Tensor, eos: Tensor, last: bool) -> Tensor:
        """[R, V] log phi of the completing extensions of the active rows (other entries 0)."""
        V = x.vocab_size
        rows = active.nonzero()[:, 0]
        cand = torch.arange(V, device=x.device) if last else eos  # [C]
        C = cand.shape[0]
        sub = x.select(rows)
        tokens = torch.cat(
            [sub.tokens.repeat_interleave(C, dim=0), cand.repeat(rows.shape[0])[:, None]], dim=1
        )
        ext = Particles(
            tokens,
            sub.lengths.repeat_interleave(C) + 1,
            sub.prompt_index.repeat_interleave(C),
            x.prompts,
            x.tokenizer,
            x.eos_token_ids,
            x.max_new_tokens,
            V,
        )
        vals = self.potential.complete(ext).to(device=x.device, dtype=torch.float64)
        if bool((vals != vals).any()) or bool((vals == math.inf).any()):
            raise ValueError("potential.complete returned NaN or +inf")
        phi = torch.zeros(x.num_rows, V, dtype=torch.float64, device=x.device)
        phi[rows[:, None], cand[None, :]] = vals.view(-1, C)
        return phi
