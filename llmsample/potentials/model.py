"""Model-based potentials: a language model's likelihood of a suffix, a classifier's label.

    from llmsample.potentials import Classifier, SuffixLikelihood

    phi = SuffixLikelihood(model, tokenizer, " and they lived happily ever after.")
    phi = Classifier(clf, clf_tokenizer, label="POSITIVE", as_twist=True)

Both score through :mod:`llmsample.hf` (teacher forcing, a classifier's forward pass):
this module never imports transformers. Their log phi is a log-probability (<= 0), so
with the default psi = 1 the prefix score bounds it (``prefix_is_upper_bound``);
``as_twist=True`` scores prefixes the same way, a heuristic that gives the bound up.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from llmsample.hf.classify import classifier_log_probs
from llmsample.hf.session import teacher_force
from llmsample.particles import Particles
from llmsample.potentials.base import Potential

__all__ = ["SuffixLikelihood", "Classifier"]


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
        self.prefix_is_upper_bound = not as_twist  # log p <= 0 = log psi
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
        logp = teacher_force(self.model, ctx, ctx_mask, suf, suf_mask).token_logp
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
        self.prefix_is_upper_bound = not as_twist  # log p <= 0 = log psi

    def complete(self, x: Particles) -> Tensor:
        texts = x.full_texts() if self.include_prompt else x.texts()
        if not texts:
            return torch.zeros(0, dtype=torch.float64, device=x.device)
        logp = classifier_log_probs(self.model, self.tokenizer, texts, self.max_length)
        return logp[:, self.label].to(device=x.device, dtype=torch.float64)

    def prefix(self, x: Particles) -> Tensor:
        return self.complete(x) if self.has_prefix else super().prefix(x)
