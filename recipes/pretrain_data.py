"""The data of ``recipes/pretrain_tiny_lm.py``: the split corpus, its BPE and the windows.

    python recipes/pretrain_tiny_lm.py --config recipes/configs/pretrain_tiny_lm.yaml

The plays come from ``llmsample/data/shakespeare.py`` split into training and held-out
plays (:func:`build_corpus`); a byte-level BPE is trained on the training side only
(:func:`train_bpe`); each side becomes one id stream (:func:`token_stream`), read in
training as shuffled windows of ``context_length + 1`` tokens (:func:`epoch_windows`,
:func:`gather_windows`) whose order follows from ``(seed, epoch)`` alone, so a resumed
run reads the batches the uninterrupted one would have. :func:`run_data` is all of it for
one run folder: the split recorded in ``data_split.json`` and the BPE saved in ``tokenizer/``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from llmsample.data.shakespeare import load_plays, split_plays
from llmsample.train.checkpoints import ResumeConflict

__all__ = [
    "EOS_TOKEN",
    "build_corpus",
    "train_bpe",
    "token_stream",
    "epoch_windows",
    "gather_windows",
    "run_data",
]

EOS_TOKEN = "<|endoftext|>"


def build_corpus(cfg) -> tuple[list[str], list[str], dict[str, list[str]]]:
    """``(train_texts, heldout_texts, split)``: the cleaned plays on each side of the split
    that ``cfg`` (a ``PretrainConfig``: ``heldout_plays``, ``train_plays``) names.

    Only ``train_texts`` reach the BPE and the model; ``heldout_texts`` are for validation.
    """
    train_names, heldout_names = split_plays(cfg.heldout_plays, cfg.train_plays)
    split = {"train_plays": train_names, "heldout_plays": heldout_names}
    train_texts = list(load_plays(train_names).values())
    heldout_texts = list(load_plays(heldout_names).values())
    return train_texts, heldout_texts, split


def train_bpe(texts: list[str], vocab_size: int, min_frequency: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on ``texts``, wrapped with EOS = BOS = PAD = <|endoftext|>."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN
    )


def token_stream(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> torch.Tensor:
    """All ``texts`` as one id stream, each document preceded by EOS and the last followed by it."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for enc in tokenizer.backend_tokenizer.encode_batch(texts):
        ids.append(eos)
        ids.extend(enc.ids)
    ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def epoch_windows(n_tokens: int, context: int, seed: int, epoch: int) -> torch.Tensor:
    """Start offsets of the shuffled training windows (``context + 1`` tokens) for one epoch.

    Each epoch shifts the window grid by a random offset and shuffles the windows, both from
    ``(seed, epoch)`` alone, so a resumed run replays the same order from ``(epoch, batch)``.
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    offset = int(torch.randint(0, context, (1,), generator=gen))
    n_windows = (n_tokens - offset - 1) // context
    if n_windows <= 0:
        offset, n_windows = 0, (n_tokens - 1) // context
    starts = offset + torch.arange(n_windows) * context
    return starts[torch.randperm(n_windows, generator=gen)]


def gather_windows(ids: torch.Tensor, starts: torch.Tensor, length: int) -> torch.Tensor:
    """The ``length``-token windows of ``ids`` that begin at ``starts``, one row each."""
    return ids[starts.unsqueeze(1) + torch.arange(length).unsqueeze(0)]


def run_data(cfg, accelerator, out_dir: Path, model_max_length: int):
    """``(tokenizer, train_ids, val_ids, split)``. The split is fixed by the config and
    recorded in ``data_split.json`` (a resumed run must keep the same one); the BPE is the
    run's own, trained by the main process on the training plays and saved in
    ``<out_dir>/tokenizer`` (with ``model_max_length``) the first time, loaded from there
    after. Raises :class:`~llmsample.train.checkpoints.ResumeConflict` if ``out_dir`` records
    another split."""
    train_texts, val_texts, split = build_corpus(cfg)
    split_file = out_dir / "data_split.json"
    if split_file.is_file() and json.loads(split_file.read_text()) != split:
        raise ResumeConflict(
            f"{split_file} differs from this config's plays; use a new out_dir, or pass "
            "--overwrite to start fresh"
        )

    tok_dir = out_dir / "tokenizer"
    if (tok_dir / "tokenizer.json").is_file():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    else:
        with accelerator.main_process_first():
            if accelerator.is_main_process:
                tokenizer = train_bpe(train_texts, cfg.vocab_size, cfg.bpe_min_frequency)
                tokenizer.model_max_length = model_max_length
                tokenizer.save_pretrained(str(tok_dir))
                split_file.write_text(json.dumps(split, indent=2))
            else:
                tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    return (
        tokenizer,
        token_stream(tokenizer, train_texts),
        token_stream(tokenizer, val_texts),
        split,
    )
