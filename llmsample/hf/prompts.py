"""Prompts as left-padded token batches: plain text, chat conversations, or ids.

``model.generate`` pads on the left and takes position ids from the attention mask;
every sampler here does the same, so prompts of different lengths run in one batch.

    batch = encode_prompts(tokenizer, ["ROMEO:", "JULIET: Ay"])          # [B, P]
    batch = encode_prompts(tokenizer, ["Make a sentence with dog, ball."], chat=True)
    eos = line_end_ids(tokenizer)   # end continuations at the end of their line
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

__all__ = ["PromptBatch", "encode_prompts", "chat_prompt_texts", "line_end_ids"]


@dataclass
class PromptBatch:
    """Left-padded prompts. ``input_ids``/``attention_mask`` are [B, P]."""

    input_ids: Tensor
    attention_mask: Tensor
    pad_token_id: int

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> PromptBatch:
        return PromptBatch(
            self.input_ids.to(device), self.attention_mask.to(device), self.pad_token_id
        )


def _left_pad(rows: list[list[int]], pad_token_id: int) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        if r:
            ids[b, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[b, width - len(r) :] = 1
    return ids, mask


def encode_prompts(
    tokenizer=None,
    prompts: str | list[str] | None = None,
    *,
    input_ids: Tensor | None = None,
    attention_mask: Tensor | None = None,
    pad_token_id: int | None = None,
    chat: bool = False,
    messages: list[list[dict]] | None = None,
) -> PromptBatch:
    """Turn text prompts, chat messages or ``input_ids``/``attention_mask`` into a
    left-padded batch.

    Text is tokenized like ``tokenizer(prompt)`` (special tokens included, as for
    ``generate``). With ``chat=True`` each text prompt becomes one user message, and
    ``messages=`` takes the conversations themselves (``[[{"role": "user", "content":
    ...}], ...]``): both go through the tokenizer's chat template with the generation
    prompt (:func:`chat_prompt_texts`). Tensors may be left or right padded: each row's
    unmasked tokens are kept, in order, and re-padded on the left. A tokenizer without a
    pad token is fine: the pad id falls back to the EOS id (the pad id never reaches the
    model unmasked).
    """
    if messages is not None:
        if prompts is not None or input_ids is not None:
            raise ValueError("pass `messages=` alone, not with `prompts=` or `input_ids=`")
        prompts, chat = chat_prompt_texts(tokenizer, messages), False
        rows = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in prompts]
        return _batch(rows, _pad_id(tokenizer, pad_token_id))
    if chat:
        if prompts is None:
            raise ValueError(
                "`chat=True` applies the chat template to text `prompts=`; "
                "token ids are already templated: drop `chat=True`"
            )
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        return encode_prompts(
            tokenizer,
            messages=[[{"role": "user", "content": t}] for t in texts],
            pad_token_id=pad_token_id,
        )
    if (prompts is None) == (input_ids is None):
        raise ValueError("pass exactly one of `prompts=` (text) or `input_ids=` (token ids)")
    pad_token_id = _pad_id(tokenizer, pad_token_id)
    if prompts is not None:
        if tokenizer is None:
            raise ValueError("text prompts need a tokenizer; pass `tokenizer=` or `input_ids=`")
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not texts:
            raise ValueError("`prompts` is an empty list; pass at least one prompt")
        rows = [list(tokenizer(t)["input_ids"]) for t in texts]
    else:
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        if input_ids.ndim != 2:
            raise ValueError(
                f"`input_ids` must be [batch, length], got shape {tuple(input_ids.shape)}"
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"`attention_mask` shape {tuple(attention_mask.shape)} does not match "
                f"`input_ids` shape {tuple(input_ids.shape)}"
            )
        keep = attention_mask.bool().cpu()
        rows = [r[k].tolist() for r, k in zip(input_ids.cpu(), keep)]
    return _batch(rows, pad_token_id)


def _pad_id(tokenizer, pad_token_id: int | None) -> int:
    if pad_token_id is None and tokenizer is not None:
        pad_token_id = tokenizer.pad_token_id
        if pad_token_id is None:
            pad_token_id = tokenizer.eos_token_id
    return 0 if pad_token_id is None else int(pad_token_id)


def _batch(rows: list[list[int]], pad_token_id: int) -> PromptBatch:
    for b, r in enumerate(rows):
        if not r:
            raise ValueError(
                f"prompt {b} is empty (no tokens). Give it at least one token, e.g. the "
                "tokenizer's BOS token or a newline."
            )
    ids, mask = _left_pad(rows, pad_token_id)
    return PromptBatch(ids, mask, int(pad_token_id))


def chat_prompt_texts(tokenizer, messages: list[list[dict]]) -> list[str]:
    """Each conversation rendered by the tokenizer's chat template, ending with the
    assistant's generation prompt: the text the model continues (special tokens are
    in the text; tokenize it with ``add_special_tokens=False``)."""
    if tokenizer is None:
        raise ValueError("chat prompts need a tokenizer (its chat template); pass `tokenizer=`")
    if getattr(tokenizer, "chat_template", None) is None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(
            f"tokenizer {name!r} has no chat template, so chat prompts cannot be built; pass "
            "plain text prompts (chat=False), or set `tokenizer.chat_template`"
        )
    if isinstance(messages, dict) or not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(
            "`messages` must be a non-empty list of conversations, each a list of "
            '{"role": ..., "content": ...} dicts, e.g. [[{"role": "user", "content": "Hi"}]]'
        )
    texts = []
    for b, conv in enumerate(messages):
        if (
            isinstance(conv, dict)
            or not conv
            or not all(isinstance(m, dict) and "role" in m and "content" in m for m in conv)
        ):
            raise ValueError(
                f"messages[{b}] is not a conversation: give a non-empty list of "
                '{"role": ..., "content": ...} dicts (one list per prompt)'
            )
        texts.append(
            tokenizer.apply_chat_template(list(conv), add_generation_prompt=True, tokenize=False)
        )
    return texts


def line_end_ids(tokenizer) -> list[int]:
    """Ids of every token whose text contains a newline, plus EOS.

    Passed as ``eos_token_id``, they end each continuation at the end of its line.
    (With a byte-level BPE such tokens are whitespace-only, so no word is lost.)
    Computed once per tokenizer object (it decodes the whole vocabulary).
    """
    return list(_line_end_ids(tokenizer))


@lru_cache(maxsize=8)
def _line_end_ids(tokenizer) -> tuple[int, ...]:
    ids = {i for i in range(len(tokenizer)) if "\n" in tokenizer.decode([i])}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return tuple(sorted(ids))
