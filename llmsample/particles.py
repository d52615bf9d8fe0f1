"""The particle view that potentials, twists and proposals read.

A :class:`Particles` object is a read-only snapshot of some rows of the SMC state:
the generated tokens so far, how many of them are real, which prompt each row
belongs to, and (lazily, cached) the decoded continuation texts. Potentials score
it; they never mutate it.

    x.tokens          # [R, t] continuation token ids (finished rows padded after EOS)
    x.lengths         # [R]    real continuation tokens, EOS included
    x.texts()         # decoded continuations, EOS and padding stripped
    x.prompt_texts()  # decoded prompt of each row
    x.select(rows)    # the same view restricted to some rows
    x.rows            # [R] each row's number in the SMC run (None outside the engine)

``rows`` lets a stateful twist find its own per-row state: the engine numbers its rows
0..R-1 in the order of its ``start``/``reorder``/``advance`` calls, and a view of some
rows (``select``) keeps their numbers.
"""

from __future__ import annotations

from functools import cached_property

import torch
from torch import Tensor

from llmsample.hf.prompts import PromptBatch

__all__ = ["Particles"]


class Particles:
    """Rows of continuations at step ``step`` (0-based count of tokens generated)."""

    def __init__(
        self,
        tokens: Tensor,
        lengths: Tensor,
        prompt_index: Tensor,
        prompts: PromptBatch,
        tokenizer,
        eos_token_ids: Tensor,
        max_new_tokens: int,
        vocab_size: int,
        rows: Tensor | None = None,
    ):
        self.tokens = tokens  # [R, t]
        self.lengths = lengths  # [R]
        self.prompt_index = prompt_index  # [R]
        self.prompts = prompts
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids  # [E]
        self.max_new_tokens = max_new_tokens
        self.vocab_size = vocab_size
        self.rows = rows  # [R] row numbers in the SMC run, or None

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]

    @property
    def step(self) -> int:
        """Number of generation steps taken so far (the width of ``tokens``)."""
        return self.tokens.shape[1]

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    def select(self, rows: Tensor) -> Particles:
        """The view restricted to ``rows`` (a bool mask or an index tensor)."""
        return Particles(
            self.tokens[rows],
            self.lengths[rows],
            self.prompt_index[rows],
            self.prompts,
            self.tokenizer,
            self.eos_token_ids,
            self.max_new_tokens,
            self.vocab_size,
            None if self.rows is None else self.rows[rows],
        )

    def content_mask(self) -> Tensor:
        """[R, t] True at real, non-EOS continuation tokens (what the text is made of)."""
        t = self.step
        pos = torch.arange(t, device=self.device)[None, :]
        real = pos < self.lengths[:, None]
        return real & ~torch.isin(self.tokens, self.eos_token_ids)

    def token_lists(self) -> list[list[int]]:
        """Real non-EOS continuation tokens of each row, as Python lists."""
        keep = self.content_mask().cpu()
        return [r[k].tolist() for r, k in zip(self.tokens.cpu(), keep)]

    def texts(self) -> list[str]:
        """Decoded continuations (EOS and padding stripped). Cached per view."""
        return self._texts

    @cached_property
    def _texts(self) -> list[str]:
        return self._decode(self.token_lists(), skip_special_tokens=False)

    def _decode(self, rows: list[list[int]], **kwargs) -> list[str]:
        if self.tokenizer is None:
            raise ValueError("decoding text needs a tokenizer; pass `tokenizer=`")
        return self.tokenizer.batch_decode(rows, **kwargs) if rows else []

    def prompt_token_lists(self) -> list[list[int]]:
        """Real (unpadded) prompt tokens of each row."""
        ids = self.prompts.input_ids.cpu()
        mask = self.prompts.attention_mask.bool().cpu()
        idx = self.prompt_index.cpu().tolist()
        return [ids[b][mask[b]].tolist() for b in idx]

    def prompt_texts(self) -> list[str]:
        """Decoded prompt of each row."""
        return self._decode(self.prompt_token_lists(), skip_special_tokens=True)

    def full_texts(self) -> list[str]:
        """Prompt and continuation decoded together (keeps the tokenizer's spacing)."""
        rows = [p + c for p, c in zip(self.prompt_token_lists(), self.token_lists())]
        return self._decode(rows, skip_special_tokens=True)
