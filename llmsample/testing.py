"""Test helpers: toy models, toy particle views and the contract check for potentials.

    from llmsample.testing import check_potential, toy_batches, toy_particles

    check_potential(Contains("a"))                    # on toy_batches(): raises if broken
    check_potential(MyPotential(), toy_batches())     # the same, explicitly
    x = toy_particles([[0, 1], [2, 8]], prompts=["a b"], max_new_tokens=4)
    check_potential(MyPotential(), x, tokens=[0, 3, 8])  # only these extensions

:func:`check_potential` holds a potential to what :mod:`llmsample.potentials.base` says
a potential is (each rule below is named in the error):

- ``complete`` and ``prefix`` return [R] float64 on the particles' device, with no NaN
  and no ``+inf`` (``-inf`` is phi = 0, a rejection); an empty view gives [0];
- without ``has_prefix`` the prefix score is 0 (psi = 1);
- the text excludes EOS: ``complete(x + EOS) == complete(x)``;
- a view of some rows (``x.select``) scores as those rows of the whole view;
- ``token_scores`` (when not None) is [R, V] float64 and, on every running row x and
  token v, equals ``complete(x + v)`` when x + v is complete (v is EOS or the step is the
  last) and ``prefix(x + v)`` otherwise;
- a ``-inf`` prefix score only where no completion survives (``complete`` of every
  completion in reach, x + EOS and, at the last step, every x + v, is ``-inf``);
- with ``prefix_is_upper_bound``: ``prefix(x) >= complete(x)`` and ``prefix(x)`` is at least
  the score of every one-token extension (as in ``token_scores``).

Breaking one raises :class:`PotentialContractError` (an ``AssertionError``) naming the
potential, the rule and the offending particle. The toy models of
:mod:`llmsample.hf.toys` are re-exported here for tests that need a model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from llmsample.hf.prompts import encode_prompts
from llmsample.hf.toys import TOY_EOS, TOY_WORDS, toy_classifier, toy_model, toy_tokenizer
from llmsample.particles import Particles
from llmsample.potentials.base import Potential

__all__ = [
    "PotentialContractError",
    "check_potential",
    "toy_particles",
    "toy_batches",
    "TOY_EOS",
    "TOY_WORDS",
    "toy_tokenizer",
    "toy_model",
    "toy_classifier",
]

_TOKENIZER = None


def _default_tokenizer():
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = toy_tokenizer(with_pad=True)
    return _TOKENIZER


class PotentialContractError(AssertionError):
    """A potential broke a rule of the potential interface (see :func:`check_potential`)."""


def toy_particles(
    rows: Sequence[Sequence[int]],
    *,
    lengths: Sequence[int] | None = None,
    prompts: Sequence[str] = ("a",),
    prompt_index: Sequence[int] | None = None,
    tokenizer=None,
    max_new_tokens: int = 4,
    vocab_size: int | None = None,
    eos: Sequence[int] = (TOY_EOS,),
) -> Particles:
    """A :class:`~llmsample.Particles` view of ``rows`` (continuation token ids, padded on
    the right with the first EOS id). ``lengths`` defaults to each row's length (EOS
    included), ``prompt_index`` to 0, ``tokenizer`` to the toy one (with a pad token),
    ``vocab_size`` to the tokenizer's size."""
    tokenizer = _default_tokenizer() if tokenizer is None else tokenizer
    width = max((len(r) for r in rows), default=0)
    tokens = torch.full((len(rows), width), eos[0], dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
    return Particles(
        tokens,
        torch.tensor([len(r) for r in rows] if lengths is None else list(lengths)),
        torch.tensor([0] * len(rows) if prompt_index is None else list(prompt_index)),
        encode_prompts(tokenizer, list(prompts)),
        tokenizer,
        torch.tensor(list(eos), dtype=torch.long),
        max_new_tokens,
        len(tokenizer) if vocab_size is None else vocab_size,
    )


def toy_batches(tokenizer=None) -> list[Particles]:
    """Three views over two prompts ("a b", "c") of the toy vocabulary, max 4 new tokens:
    the first step (empty continuations), a middle step (with rows that ended), and the
    last step (every extension completes)."""
    eos, kw = TOY_EOS, dict(prompts=["a b", "c"], tokenizer=tokenizer, max_new_tokens=4)
    return [
        toy_particles([[], [], []], prompt_index=[0, 1, 0], **kw),
        toy_particles(
            [[0, 1], [2, 3], [1, eos], [4, 4], [eos], [0, 7]],
            prompt_index=[0, 1, 0, 1, 1, 1],
            **kw,
        ),
        toy_particles([[0, 1, 2], [5, 6, 7], [3, eos], [7, 0, 7]], prompt_index=[0, 1, 1, 0], **kw),
    ]


def check_potential(
    potential: Potential,
    particles: Particles | Sequence[Particles] | None = None,
    *,
    tokens: Sequence[int] | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-5,
) -> None:
    """Check ``potential`` against the interface (module docstring) on ``particles``
    (one view or several; :func:`toy_batches` by default). ``tokens``: the extension
    tokens to try (all ``vocab_size`` of them by default). Scores compare equal within
    ``atol + rtol * |expected|``. Raises :class:`PotentialContractError`."""
    if particles is None:
        particles = toy_batches()
    views = [particles] if isinstance(particles, Particles) else list(particles)
    for x in views:
        _Check(potential, x, tokens, atol, rtol).run()


class _Check:
    """The rules on one view ``x``."""

    def __init__(self, potential: Potential, x: Particles, tokens, atol: float, rtol: float):
        self.p, self.x, self.atol, self.rtol = potential, x, atol, rtol
        V = x.vocab_size
        cand = (
            torch.arange(V) if tokens is None else torch.as_tensor(list(tokens), dtype=torch.long)
        )
        if len(cand) and not (0 <= int(cand.min()) and int(cand.max()) < V):
            raise ValueError(
                f"check_potential `tokens=` must be ids in [0, {V}), got {cand.tolist()}"
            )
        eos = x.eos_token_ids.cpu()
        # x + v is complete when v is EOS or the step is the last
        self.cand = cand
        self.completing = torch.isin(cand, eos) | (x.step + 1 >= x.max_new_tokens)
        # running rows (the rows a twist or a proposal scores): all real tokens, no EOS yet
        running = (x.lengths.cpu() == x.step) & (x.step < x.max_new_tokens)
        if x.step > 0:
            running &= ~torch.isin(x.tokens[:, -1].cpu(), eos)
        self.live = running.nonzero()[:, 0]

    # ---------------------------------------------------------------- reporting

    def fail(self, rule: str, detail: str, row: int | None = None, token: int | None = None):
        where = ""
        if row is not None:
            x = self.x
            n = int(x.lengths[row])
            ids = x.tokens[row, :n].tolist()
            try:
                text = repr(x.select(torch.tensor([row], device=x.device)).texts()[0])
            except Exception:  # a view without a tokenizer still names its tokens
                text = "?"
            where = (
                f"; particle: row {row} of prompt {int(x.prompt_index[row])} at step "
                f"{x.step}/{x.max_new_tokens}, tokens {ids}, text {text}"
            )
            if token is not None:
                where += f", extended by token {token}"
        raise PotentialContractError(f"{self.p!r} breaks the rule '{rule}'{where}: {detail}")

    def close(self, got: Tensor, want: Tensor) -> Tensor:
        """Equal (``-inf`` included) or finite and within the tolerance."""
        near = (got - want).abs() <= self.atol + self.rtol * want.abs()
        return (got == want) | (got.isfinite() & want.isfinite() & near)

    # ---------------------------------------------------------------- rules

    def scores(self, method: str, x: Particles, shape: tuple[int, ...]) -> Tensor:
        values = getattr(self.p, method)(x)
        rule = f"{method} returns {'[R, V]' if len(shape) == 2 else '[R]'} float64 on the "
        rule += "particles' device"
        if not isinstance(values, Tensor):
            self.fail(rule, f"got {type(values).__name__}")
        if tuple(values.shape) != shape or values.dtype != torch.float64:
            self.fail(rule, f"expected {list(shape)}, got {list(values.shape)} {values.dtype}")
        if values.device != x.device:
            self.fail(rule, f"got device {values.device}, the particles are on {x.device}")
        bad = torch.isnan(values) | torch.isposinf(values)
        if bad.any():
            r = int(bad.nonzero()[0, 0])
            self.fail(f"{method} has no NaN or +inf", f"got {values[r].tolist()}", r)
        return values.detach().cpu()

    def run(self) -> None:
        p, x = self.p, self.x
        R, V = x.num_rows, x.vocab_size
        complete = self.scores("complete", x, (R,))
        prefix = self.scores("prefix", x, (R,))
        if not p.has_prefix and (prefix != 0).any():
            r = int((prefix != 0).nonzero()[0, 0])
            self.fail("psi = 1 without has_prefix", f"prefix {prefix[r].item()}", r)
        ts = p.token_scores(x)
        if ts is not None:
            ts = self.scores("token_scores", x, (R, V))
        self.check_empty()
        self.check_select(complete, prefix, ts)
        if len(self.live) and len(self.cand):
            self.check_extensions(complete, prefix, ts)

    def check_empty(self) -> None:
        empty = self.x.select(torch.zeros(self.x.num_rows, dtype=torch.bool, device=self.x.device))
        self.scores("complete", empty, (0,))
        self.scores("prefix", empty, (0,))

    def check_select(self, complete: Tensor, prefix: Tensor, ts: Tensor | None) -> None:
        R = self.x.num_rows
        if R < 2:
            return
        idx = torch.arange(R - 1, 0, -1)  # reversed, without row 0: a different batch
        sub = self.x.select(idx.to(self.x.device))
        rule = "a view of some rows scores as those rows of the whole view"
        pairs = [("complete", self.scores("complete", sub, (R - 1,)), complete[idx])]
        pairs.append(("prefix", self.scores("prefix", sub, (R - 1,)), prefix[idx]))
        if ts is not None and self.p.token_scores(sub) is not None:
            sub_ts = self.scores("token_scores", sub, (R - 1, self.x.vocab_size))
            pairs.append(("token_scores", sub_ts, ts[idx]))
        for method, values, want in pairs:
            ok = self.close(values, want)
            if not ok.all():
                i = int((~ok).reshape(len(idx), -1).any(-1).nonzero()[0, 0])
                self.fail(rule, f"{method} {values[i].tolist()} vs {want[i].tolist()}", int(idx[i]))

    def extended(self) -> Particles:
        """The live rows, each extended by every candidate token: [L * C] rows."""
        x, live, cand = self.x, self.live.to(self.x.device), self.cand.to(self.x.device)
        L, C = len(live), len(cand)
        tokens = torch.cat([x.tokens[live].repeat_interleave(C, 0), cand.repeat(L)[:, None]], dim=1)
        return Particles(
            tokens,
            torch.full((L * C,), x.step + 1, dtype=x.lengths.dtype, device=x.device),
            x.prompt_index[live].repeat_interleave(C),
            x.prompts,
            x.tokenizer,
            x.eos_token_ids,
            x.max_new_tokens,
            x.vocab_size,
        )

    def check_extensions(self, complete: Tensor, prefix: Tensor, ts: Tensor | None) -> None:
        live, cand, completing = self.live, self.cand, self.completing
        L, C = len(live), len(cand)
        ext = self.extended()
        ext_complete = self.scores("complete", ext, (L * C,)).view(L, C)
        ext_prefix = self.scores("prefix", ext, (L * C,)).view(L, C)
        want = torch.where(completing[None, :], ext_complete, ext_prefix)  # [L, C]

        eos_cols = torch.isin(cand, self.x.eos_token_ids.cpu()).nonzero()[:, 0]
        if len(eos_cols):  # the text excludes EOS
            got, now = ext_complete[:, eos_cols[0]], complete[live]
            ok = self.close(got, now)
            if not ok.all():
                i = int((~ok).nonzero()[0, 0])
                rule = "complete(x + EOS) == complete(x) (the text excludes EOS)"
                detail = f"{got[i].item()} vs {now[i].item()}"
                self.fail(rule, detail, int(live[i]), int(cand[eos_cols[0]]))

        if ts is not None:
            got = ts[live][:, cand]
            ok = self.close(got, want)
            if not ok.all():
                i, j = (int(v) for v in (~ok).nonzero()[0])
                of = "complete" if completing[j] else "prefix"
                rule = (
                    "token_scores[x, v] is complete(x + v) when x + v is complete "
                    "(EOS or the last step), else prefix(x + v)"
                )
                detail = f"token_scores {got[i, j].item()} vs {of}(x + v) {want[i, j].item()}"
                self.fail(rule, detail, int(live[i]), int(cand[j]))

        dead = torch.isneginf(prefix[live])  # psi = 0: no completion may survive
        reach = ext_complete[:, completing]
        alive = dead & ~torch.isneginf(reach).all(-1)
        if alive.any():
            i = int(alive.nonzero()[0, 0])
            j = int(completing.nonzero()[(~torch.isneginf(reach[i])).nonzero()[0, 0], 0])
            rule = "a -inf prefix score only where no completion survives"
            detail = f"prefix -inf but complete(x + v) = {ext_complete[i, j].item()}"
            self.fail(rule, detail, int(live[i]), int(cand[j]))

        if self.p.prefix_is_upper_bound:
            rule = "prefix_is_upper_bound: prefix(x) >= complete(x) and every extension's score"
            psi = prefix[live]
            slack = self.atol + self.rtol * psi.abs().nan_to_num(posinf=0.0)
            below = ~(complete[live] <= psi + slack) & ~torch.isneginf(complete[live])
            if below.any():
                i = int(below.nonzero()[0, 0])
                detail = f"prefix {psi[i].item()} < complete {complete[live][i].item()}"
                self.fail(rule, detail, int(live[i]))
            above = ~(want <= psi[:, None] + slack[:, None]) & ~torch.isneginf(want)
            if above.any():
                i, j = (int(v) for v in above.nonzero()[0])
                of = "complete" if completing[j] else "prefix"
                detail = f"prefix(x) {psi[i].item()} < {of}(x + v) {want[i, j].item()}"
                self.fail(rule, detail, int(live[i]), int(cand[j]))
