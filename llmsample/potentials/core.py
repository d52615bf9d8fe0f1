"""Potentials: non-negative scores phi(x, c) that define the target.

    sigma(x | c) = p(x | c) * phi(x, c) / Z(c)

A potential only scores; it never samples. All scores are in log space (``-inf`` is
phi = 0, a hard rejection). Three entry points, all on a :class:`~llmsample.Particles`
view of R rows:

- ``complete(x) -> [R]``: log phi of complete continuations (ended by EOS or cut at
  ``max_new_tokens``; the text excludes EOS). Required.
- ``prefix(x) -> [R]``: log of a prefix score usable as an SMC twist psi_t
  (``has_prefix`` says whether it is informative; the default is psi = 1). A twist
  must be > 0 wherever the posterior has mass: for a hard constraint, prefix score 0
  must mean "no completion can satisfy it".
- ``token_scores(x) -> [R, V] | None``: the score of every one-token extension at
  once (prefix score, or the complete score when the extension completes the
  sequence: the token is EOS or the step is the last). This enables the locally
  optimal proposal. ``None`` when not available.

Combine with ``*`` (product) and ``**`` (tempering):

    phi = Contains("love") * TokenMask(banned=[bad_id]) ** 2.0
"""

from __future__ import annotations

import math
import operator
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import regex
import torch
from torch import Tensor

from llmsample.hf.session import score_continuations
from llmsample.particles import Particles

__all__ = [
    "Potential",
    "Constraint",
    "Regex",
    "Contains",
    "TokenMask",
    "SuffixLikelihood",
    "Classifier",
    "Reward",
    "Tempered",
    "Product",
    "PerPrompt",
]

NEG_INF = float("-inf")


def _hard(ok: Sequence[bool], device) -> Tensor:
    ok = torch.as_tensor(list(ok), dtype=torch.bool, device=device)
    return torch.where(ok, 0.0, NEG_INF).to(torch.float64)


class Potential(ABC):
    """Base class. Subclasses implement :meth:`complete`; the rest is optional."""

    has_prefix: bool = False

    @abstractmethod
    def complete(self, x: Particles) -> Tensor:
        """log phi of complete continuations, [R] float64."""

    def prefix(self, x: Particles) -> Tensor:
        return torch.zeros(x.num_rows, dtype=torch.float64, device=x.device)

    def token_scores(self, x: Particles) -> Tensor | None:
        return None

    def __mul__(self, other: Potential) -> Product:
        return Product(self, other)

    def __pow__(self, beta: float) -> Tempered:
        return Tempered(self, beta)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Constraint(Potential):
    """Hard constraint from a predicate on the decoded continuation text.

    ``prefix_predicate``, when given, must be prefix-closed: it returns False only for
    prefixes that no completion can rescue. It then serves as an exact-support twist.
    """

    def __init__(
        self,
        predicate: Callable[[str], bool],
        prefix_predicate: Callable[[str], bool] | None = None,
        name: str | None = None,
    ):
        self.predicate = predicate
        self.prefix_predicate = prefix_predicate
        self.has_prefix = prefix_predicate is not None
        self.name = name or getattr(predicate, "__name__", "predicate")

    def complete(self, x: Particles) -> Tensor:
        return _hard([bool(self.predicate(t)) for t in x.texts()], x.device)

    def prefix(self, x: Particles) -> Tensor:
        if self.prefix_predicate is None:
            return super().prefix(x)
        return _hard([bool(self.prefix_predicate(t)) for t in x.texts()], x.device)

    def __repr__(self) -> str:
        return f"Constraint({self.name})"


class Regex(Constraint):
    """The continuation must match ``pattern``.

    ``mode="search"`` (anywhere in the text) or ``"fullmatch"`` (the whole text). In
    fullmatch mode the prefix score is exact support: a prefix survives iff some
    extension could still match (partial matching from the ``regex`` package).
    """

    def __init__(self, pattern: str, mode: str = "search", flags: int = 0):
        if mode not in ("search", "fullmatch"):
            raise ValueError(f"Regex mode must be 'search' or 'fullmatch', got {mode!r}")
        try:
            self.pattern = regex.compile(pattern, flags)
        except regex.error as err:
            raise ValueError(f"invalid regular expression {pattern!r}: {err}") from None
        match = getattr(self.pattern, mode)
        partial = None
        if mode == "fullmatch":

            def partial(text: str) -> bool:
                # a prefix cut inside a multi-byte character decodes to U+FFFD: drop it,
                # the character is not known yet (permissive is safe for a twist)
                text = text.rstrip("\ufffd")
                return self.pattern.fullmatch(text, partial=True) is not None

        super().__init__(lambda t: match(t) is not None, partial, name=f"{mode} {pattern!r}")


class Contains(Constraint):
    """Every word must appear in the continuation as a whole word (case-insensitive
    unless ``case_sensitive``).

    Any prefix can still be extended to contain the words, so there is no exact prefix
    score. ``prefix_bonus > 0`` adds a heuristic twist psi = exp(bonus * number of the
    words already present): SMC then resamples towards prefixes that have made
    progress. Any positive twist keeps the final weights exact; a good one only lowers
    variance.
    """

    def __init__(self, *words: str, case_sensitive: bool = False, prefix_bonus: float = 0.0):
        if not words or any(not w or not w.strip() for w in words):
            raise ValueError("Contains needs at least one non-empty word")
        if not (prefix_bonus >= 0 and math.isfinite(prefix_bonus)):  # also rejects NaN
            raise ValueError(f"prefix_bonus must be finite and >= 0, got {prefix_bonus}")
        flags = 0 if case_sensitive else regex.IGNORECASE
        self._pats = [regex.compile(rf"(?<!\w){regex.escape(w)}(?!\w)", flags) for w in words]
        self.words, self.prefix_bonus = words, float(prefix_bonus)
        super().__init__(
            lambda t: all(p.search(t) for p in self._pats), name=f"contains {list(words)}"
        )
        self.has_prefix = prefix_bonus > 0

    def prefix(self, x: Particles) -> Tensor:
        if not self.has_prefix:
            return super().prefix(x)
        found = [sum(bool(p.search(t)) for p in self._pats) for t in x.texts()]
        return self.prefix_bonus * torch.tensor(found, dtype=torch.float64, device=x.device)


class TokenMask(Potential):
    """Hard token-level constraint: only ``allowed`` token ids (or none of ``banned``).

    EOS is always allowed. Fully token-level, so it offers exact prefix scores and
    ``token_scores`` (the locally optimal proposal is then exact rejection-free).
    """

    has_prefix = True

    def __init__(self, allowed: Sequence[int] | None = None, banned: Sequence[int] | None = None):
        if (allowed is None) == (banned is None):
            raise ValueError("TokenMask needs exactly one of `allowed=` or `banned=`")
        self.allowed = None if allowed is None else _token_ids(allowed, "allowed")
        self.banned = None if banned is None else _token_ids(banned, "banned")
        if self.allowed is not None and not len(self.allowed):
            raise ValueError(
                "TokenMask(allowed=[]) allows no token but EOS; give at least one token id"
            )

    def _table(self, vocab: int, device) -> Tensor:
        """[V] bool lookup of allowed ids, built once per (vocab, device)."""
        key = (vocab, str(device))
        if getattr(self, "_key", None) != key:
            ids = self.allowed if self.allowed is not None else self.banned
            top = int(ids.max()) + 1 if len(ids) else 0
            table = torch.zeros(max(vocab, top), dtype=torch.bool)
            table[ids] = True
            self._cache = (table if self.allowed is not None else ~table).to(device)
            self._key = key
        return self._cache

    def _ok(self, tokens: Tensor, x: Particles) -> Tensor:
        ok = self._table(x.vocab_size, x.device)[tokens]
        return ok | (tokens[..., None] == x.eos_token_ids).any(-1)

    def complete(self, x: Particles) -> Tensor:
        pos = torch.arange(x.step, device=x.device)[None, :]
        ok = self._ok(x.tokens, x) | (pos >= x.lengths[:, None])
        return torch.where(ok.all(dim=1), 0.0, NEG_INF).to(torch.float64)

    prefix = complete

    def token_scores(self, x: Particles) -> Tensor | None:
        now = self.complete(x)  # [R]
        ok = self._ok(torch.arange(x.vocab_size, device=x.device), x)  # [V]
        return now[:, None] + torch.where(ok, 0.0, NEG_INF).to(torch.float64)[None, :]


def _token_ids(ids, name: str) -> Tensor:
    """A list of token ids as a long tensor: a TypeError for anything but integers (bools
    included), a ValueError for ids below 0 (they would index from the vocabulary's end)."""
    items = [ids] if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__") else ids
    out = []
    for i in items:
        if isinstance(i, bool) or not hasattr(i, "__index__"):
            raise TypeError(f"TokenMask `{name}=` must be a list of integer ids, got {i!r}")
        out.append(operator.index(i))
    if any(i < 0 for i in out):
        raise ValueError(f"TokenMask `{name}=` holds the negative id {min(out)}; ids are >= 0")
    return torch.tensor(out, dtype=torch.long)


class SuffixLikelihood(Potential):
    """Infilling: phi(x, c) = p_model(suffix | c, x), scored by teacher forcing.

    ``suffix`` is one string for every prompt or one per prompt. With
    ``as_twist=True`` the same quantity on a prefix serves as the twist (a heuristic,
    not the optimal twist, but it resamples towards prefixes that fit the suffix).
    """

    def __init__(self, model, tokenizer, suffix: str | Sequence[str], as_twist: bool = False):
        if not isinstance(suffix, str):
            suffix = list(suffix)
            if not suffix or not all(isinstance(t, str) for t in suffix):
                raise ValueError(
                    "SuffixLikelihood `suffix` must be a string or a non-empty list of strings "
                    "(one per prompt)"
                )
        self.model, self.tokenizer = model, tokenizer
        self.suffix = suffix
        self.has_prefix = as_twist
        self.forward_tokens = 0

    def _check_prompts(self, x: Particles) -> None:
        if not isinstance(self.suffix, str) and len(self.suffix) != x.prompts.size:
            raise ValueError(
                f"SuffixLikelihood has {len(self.suffix)} suffixes but the batch has "
                f"{x.prompts.size} prompt(s); pass one suffix per prompt, or one string for all"
            )

    def _suffix_ids(self, b: int) -> list[int]:
        text = self.suffix if isinstance(self.suffix, str) else self.suffix[b]
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"suffix for prompt {b} is empty; SuffixLikelihood needs text")
        return ids

    def complete(self, x: Particles) -> Tensor:
        self._check_prompts(x)
        if x.num_rows == 0:
            return torch.zeros(0, dtype=torch.float64, device=x.device)
        contexts = [p + c for p, c in zip(x.prompt_token_lists(), x.token_lists())]
        suffixes = [self._suffix_ids(b) for b in x.prompt_index.tolist()]
        P, S = max(map(len, contexts)), max(map(len, suffixes))
        pad = x.prompts.pad_token_id
        ctx = torch.full((len(contexts), P), pad, dtype=torch.long)
        ctx_mask = torch.zeros_like(ctx)
        suf = torch.full((len(contexts), S), pad, dtype=torch.long)
        suf_mask = torch.zeros_like(suf)
        for r, (c, s) in enumerate(zip(contexts, suffixes)):
            ctx[r, P - len(c) :], ctx_mask[r, P - len(c) :] = torch.tensor(c), 1
            suf[r, : len(s)], suf_mask[r, : len(s)] = torch.tensor(s), 1
        self.forward_tokens += ctx.numel() + suf.numel()
        logp = score_continuations(self.model, ctx, ctx_mask, suf, suf_mask)
        return logp.sum(-1).to(device=x.device, dtype=torch.float64)

    def prefix(self, x: Particles) -> Tensor:
        return self.complete(x) if self.has_prefix else super().prefix(x)


class Classifier(Potential):
    """phi = p_classifier(label | text) for a Hugging Face sequence classifier.

    ``include_prompt`` scores prompt + continuation instead of the continuation.
    ``as_twist`` also scores prefixes (the classifier applied to partial text).
    """

    def __init__(
        self,
        model,
        tokenizer,
        label: int | str,
        include_prompt: bool = False,
        as_twist: bool = False,
        max_length: int = 512,
    ):
        if isinstance(label, str):
            table = getattr(model.config, "label2id", {}) or {}
            if label not in table:
                raise ValueError(f"label {label!r} not in the classifier's labels {list(table)}")
            label = table[label]
        if tokenizer.pad_token is None:
            raise ValueError(
                "the classifier's tokenizer has no pad token, needed to batch texts; set "
                "tokenizer.pad_token = tokenizer.eos_token and model.config.pad_token_id"
            )
        self.model, self.tokenizer, self.label = model, tokenizer, int(label)
        self.include_prompt, self.has_prefix, self.max_length = include_prompt, as_twist, max_length

    def complete(self, x: Particles) -> Tensor:
        texts = x.full_texts() if self.include_prompt else x.texts()
        if not texts:
            return torch.zeros(0, dtype=torch.float64, device=x.device)
        device = next(self.model.parameters()).device
        enc = self.tokenizer(
            texts, return_tensors="pt", padding=True, truncation=True, max_length=self.max_length
        ).to(device)
        with torch.inference_mode():
            logits = self.model(**enc).logits.float()
        logp = torch.log_softmax(logits, dim=-1)[:, self.label]
        return logp.to(device=x.device, dtype=torch.float64)

    def prefix(self, x: Particles) -> Tensor:
        return self.complete(x) if self.has_prefix else super().prefix(x)


class Reward(Potential):
    """log phi from a callable on texts: ``fn(list[str]) -> list[float]`` of log rewards.

    ``prefix_fn`` (same signature) optionally scores prefixes for use as a twist.
    """

    def __init__(
        self,
        fn: Callable[[list[str]], Sequence[float]],
        prefix_fn: Callable[[list[str]], Sequence[float]] | None = None,
    ):
        self.fn, self.prefix_fn = fn, prefix_fn
        self.has_prefix = prefix_fn is not None

    def _call(self, fn, x: Particles) -> Tensor:
        values = torch.as_tensor(list(fn(x.texts())), dtype=torch.float64, device=x.device)
        if values.shape != (x.num_rows,):
            raise ValueError(
                f"reward function returned {tuple(values.shape)} values for {x.num_rows} texts"
            )
        return values

    def complete(self, x: Particles) -> Tensor:
        return self._call(self.fn, x)

    def prefix(self, x: Particles) -> Tensor:
        return self._call(self.prefix_fn, x) if self.prefix_fn else super().prefix(x)


class Tempered(Potential):
    """phi ** beta (log scores times ``beta``; beta = 0 gives phi = 1 even where phi = 0
    would be rejected, so beta must be > 0)."""

    def __init__(self, potential: Potential, beta: float):
        if not beta > 0:
            raise ValueError(f"tempering exponent beta must be > 0, got {beta}")
        self.potential, self.beta = potential, float(beta)
        self.has_prefix = potential.has_prefix

    def complete(self, x: Particles) -> Tensor:
        return self.beta * self.potential.complete(x)

    def prefix(self, x: Particles) -> Tensor:
        return self.beta * self.potential.prefix(x)

    def token_scores(self, x: Particles) -> Tensor | None:
        s = self.potential.token_scores(x)
        return None if s is None else self.beta * s

    def __repr__(self) -> str:
        return f"{self.potential!r} ** {self.beta}"


class Product(Potential):
    """phi = prod_k phi_k (log scores add). Token scores exist only if all parts have them."""

    def __init__(self, *potentials: Potential):
        flat: list[Potential] = []
        for p in potentials:
            flat.extend(p.potentials if isinstance(p, Product) else [p])
        if not flat:
            raise ValueError("Product needs at least one potential")
        self.potentials = flat
        self.has_prefix = any(p.has_prefix for p in flat)

    def complete(self, x: Particles) -> Tensor:
        return sum(p.complete(x) for p in self.potentials)

    def prefix(self, x: Particles) -> Tensor:
        return sum(p.prefix(x) for p in self.potentials)

    def token_scores(self, x: Particles) -> Tensor | None:
        parts = [p.token_scores(x) for p in self.potentials]
        return None if any(s is None for s in parts) else sum(parts)

    def __repr__(self) -> str:
        return " * ".join(repr(p) for p in self.potentials)


class PerPrompt(Potential):
    """A different potential for each prompt of the batch: ``potentials[b]`` scores the
    rows of prompt b (e.g. different keywords per prompt). Token scores exist only if
    every part has them."""

    def __init__(self, potentials: Sequence[Potential]):
        self.potentials = list(potentials)
        if not self.potentials:
            raise ValueError("PerPrompt needs one potential per prompt")
        self.has_prefix = any(p.has_prefix for p in self.potentials)

    def _dispatch(self, x: Particles, method: str, shape: tuple[int, ...]) -> Tensor | None:
        out = torch.zeros((x.num_rows, *shape), dtype=torch.float64, device=x.device)
        for b in x.prompt_index.unique().tolist():
            if b >= len(self.potentials):
                raise ValueError(
                    f"PerPrompt has {len(self.potentials)} potentials but prompt {b} exists"
                )
            rows = x.prompt_index == b
            values = getattr(self.potentials[b], method)(x.select(rows))
            if values is None:
                return None
            out[rows] = values.to(out)
        return out

    def complete(self, x: Particles) -> Tensor:
        return self._dispatch(x, "complete", ())

    def prefix(self, x: Particles) -> Tensor:
        return self._dispatch(x, "prefix", ())

    def token_scores(self, x: Particles) -> Tensor | None:
        return self._dispatch(x, "token_scores", (x.vocab_size,))

    @property
    def forward_tokens(self) -> int:
        return sum(getattr(p, "forward_tokens", 0) for p in self.potentials)
