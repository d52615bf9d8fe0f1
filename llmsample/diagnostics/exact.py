"""Exact posteriors by brute-force enumeration, for small vocabularies and horizons.

The target lives on continuations of length <= T that end in EOS, or that reach T
tokens without EOS (cut continuations are complete). With V tokens of which one is
EOS there are sum_{k<T} (V-1)^k + (V-1)^T of them: 37,449 for V = 9, T = 5.

    target = enumerate_target(model, tok, "a b", potential, max_new_tokens=4, eos_token_id=8)
    target.log_z                    # exact log Z(c)
    target.log_sigma                # [M] exact posterior log-probabilities
    target.log_psi[(0, 3)]          # optimal twist of the prefix (0, 3)
    target.tv(samples, log_weights) # TV of a weighted sample set to sigma

Used by the tests and the ``exact`` eval task: samplers are checked against it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from llmsample.hf.prompts import encode_prompts
from llmsample.hf.session import full_forward, vocab_size
from llmsample.hf.toys import TOY_EOS, toy_model, toy_tokenizer  # re-exported: their old home
from llmsample.particles import Particles
from llmsample.potentials.base import Potential

__all__ = ["ExactTarget", "enumerate_target", "toy_tokenizer", "toy_model", "TOY_EOS"]


@dataclass
class ExactTarget:
    """All complete continuations of one prompt with exact log p, log phi and sigma."""

    sequences: list[tuple[int, ...]]  # complete continuations (EOS included when it ended one)
    log_p: Tensor  # [M] float64
    log_phi: Tensor  # [M] float64
    log_psi: dict[tuple[int, ...], float] = field(repr=False)  # optimal twist of each prefix

    @property
    def log_z(self) -> float:
        return float(torch.logsumexp(self.log_p + self.log_phi, dim=0))

    @property
    def log_sigma(self) -> Tensor:
        return self.log_p + self.log_phi - self.log_z

    def index(self) -> dict[tuple[int, ...], int]:
        return {s: i for i, s in enumerate(self.sequences)}

    def empirical(
        self, samples: list[tuple[int, ...]], log_weights: Tensor | None = None
    ) -> Tensor:
        """The (weighted) empirical distribution of ``samples`` over the M sequences."""
        idx = self.index()
        w = torch.ones(len(samples), dtype=torch.float64) if log_weights is None else None
        if w is None:
            w = torch.softmax(log_weights.double().flatten(), dim=0)
        else:
            w = w / len(samples)
        out = torch.zeros(len(self.sequences), dtype=torch.float64)
        for s, wi in zip(samples, w.tolist()):
            if s not in idx:
                raise ValueError(f"sample {s} is not a complete continuation of this target")
            out[idx[s]] += wi
        return out

    def tv(self, samples: list[tuple[int, ...]], log_weights: Tensor | None = None) -> float:
        """Total variation between the weighted sample set and sigma."""
        return 0.5 * float(
            (self.empirical(samples, log_weights) - self.log_sigma.exp()).abs().sum()
        )

    def tv_noise_floor(self, m: int, q: float = 0.99, reps: int = 500, seed: int = 0) -> float:
        """The q-quantile of TV(sigma, empirical of m exact iid draws), by simulation."""
        gen = torch.Generator().manual_seed(seed)
        sigma = self.log_sigma.exp()
        draws = torch.multinomial(
            sigma.float().expand(reps, -1), m, replacement=True, generator=gen
        )
        counts = torch.zeros(reps, len(sigma), dtype=torch.float64)
        counts.scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.float64))
        tvs = 0.5 * (counts / m - sigma).abs().sum(dim=1)
        return float(torch.quantile(tvs, q))


@torch.inference_mode()
def _next_logp(model, prompt: list[int], prefixes: list[tuple[int, ...]], chunk: int) -> Tensor:
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(prefixes), chunk):
        rows = torch.tensor([prompt + list(p) for p in prefixes[i : i + chunk]], device=device)
        logits = full_forward(model, rows)[0][:, -1].float()
        out.append(torch.log_softmax(logits, dim=-1).double().cpu())
    return torch.cat(out)


def enumerate_target(
    model,
    tokenizer,
    prompt: str | list[int],
    potential: Potential | None,
    max_new_tokens: int,
    eos_token_id: int,
    chunk: int = 4096,
    limit: int = 200_000,
) -> ExactTarget:
    """Enumerate every complete continuation of ``prompt`` with exact log p and log phi."""
    V, T = vocab_size(model), max_new_tokens
    size = sum((V - 1) ** k for k in range(T)) + (V - 1) ** T
    if size > limit:
        raise ValueError(f"{size} sequences exceed the enumeration limit {limit}; shrink V or T")
    if isinstance(prompt, str):
        prompt = encode_prompts(tokenizer, [prompt]).input_ids[0].tolist()
    seqs: list[tuple[int, ...]] = []
    log_p: list[float] = []
    frontier, frontier_lp = [()], torch.zeros(1, dtype=torch.float64)
    for depth in range(T):
        nxt = _next_logp(model, prompt, frontier, chunk)  # [F, V]
        joint = frontier_lp[:, None] + nxt  # [F, V]
        last = depth == T - 1
        new_frontier, new_lp = [], []
        for f, prefix in enumerate(frontier):
            for v in range(V):
                s = prefix + (v,)
                if v == eos_token_id or last:
                    seqs.append(s)
                    log_p.append(float(joint[f, v]))
                else:
                    new_frontier.append(s)
                    new_lp.append(float(joint[f, v]))
        frontier, frontier_lp = new_frontier, torch.tensor(new_lp, dtype=torch.float64)
    lp = torch.tensor(log_p, dtype=torch.float64)
    phi = _score(potential, tokenizer, prompt, seqs, eos_token_id, T, V, chunk)
    return ExactTarget(seqs, lp, phi, _optimal_twist(seqs, lp, phi))


def _score(potential, tokenizer, prompt, seqs, eos, T, V, chunk) -> Tensor:
    if potential is None:
        return torch.zeros(len(seqs), dtype=torch.float64)
    pb = encode_prompts(input_ids=torch.tensor([prompt]), pad_token_id=eos)
    eos_t = torch.tensor([eos])
    out = []
    for i in range(0, len(seqs), chunk):
        part = seqs[i : i + chunk]
        toks = torch.full((len(part), T), eos, dtype=torch.long)
        for r, s in enumerate(part):
            toks[r, : len(s)] = torch.tensor(s)
        lengths = torch.tensor([len(s) for s in part])
        x = Particles(
            toks, lengths, torch.zeros(len(part), dtype=torch.long), pb, tokenizer, eos_t, T, V
        )
        out.append(potential.complete(x).double().cpu())
    return torch.cat(out)


def _optimal_twist(seqs, log_p: Tensor, log_phi: Tensor) -> dict[tuple[int, ...], float]:
    """log psi*(prefix) = log sum_{x extends prefix} p(x) phi(x) - log p(prefix).

    Computed as a logsumexp of the joint over completions minus the prefix's own log p,
    where log p(prefix) = the joint of any completion minus its conditional remainder;
    we accumulate sum p(x) phi(x) and sum p(x) over extensions (the latter is p(prefix)).
    """
    joint = (log_p + log_phi).tolist()
    lp = log_p.tolist()
    acc_joint: dict[tuple[int, ...], list[float]] = {}
    acc_p: dict[tuple[int, ...], list[float]] = {}
    for s, j, p in zip(seqs, joint, lp):
        for k in range(len(s)):  # proper prefixes, the empty one included
            acc_joint.setdefault(s[:k], []).append(j)
            acc_p.setdefault(s[:k], []).append(p)
    out = {}
    for prefix, js in acc_joint.items():
        num = torch.logsumexp(torch.tensor(js, dtype=torch.float64), 0)
        den = torch.logsumexp(torch.tensor(acc_p[prefix], dtype=torch.float64), 0)
        out[prefix] = float(num - den) if math.isfinite(float(den)) else float("-inf")
    return out
