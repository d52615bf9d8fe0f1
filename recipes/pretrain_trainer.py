"""The model and trainer of ``recipes/pretrain_tiny_lm.py``: build, train, validate, export.

    python recipes/pretrain_tiny_lm.py --config recipes/configs/pretrain_tiny_lm.yaml

:func:`build_model` makes the Llama or GPT-2 the recipe's config describes;
:class:`PretrainTrainer` is the shared :class:`llmsample.train.base.Trainer` loop with this
recipe's step (next-token cross-entropy on shuffled windows, the learning rate from
:func:`lr_factor`), its checkpointed data position, its validation and its export (with
``recipes/pretrain_eval.py``). Every ``cfg`` here is the recipe's ``PretrainConfig``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from pretrain_data import epoch_windows, gather_windows  # recipes/: this file's folder
from pretrain_eval import evaluate, export_fp16
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedTokenizerFast

from llmsample.train import TrainConfig, Trainer

__all__ = [
    "ARCHS",
    "LOG",
    "max_positions",
    "build_model",
    "lr_factor",
    "train_config",
    "PretrainTrainer",
]

ARCHS = ("llama", "gpt2")
LOG = "log.jsonl"  # the run's event log in out_dir (cut back to the checkpoint on resume)


def max_positions(cfg) -> int:
    """Positions the model accepts (RoPE has no table: llama defaults to 4x the context)."""
    if cfg.max_position_embeddings:
        return cfg.max_position_embeddings
    return 4 * cfg.context_length if cfg.arch == "llama" else cfg.context_length


def build_model(cfg, tokenizer: PreTrainedTokenizerFast):
    """The untrained Llama or GPT-2 (``cfg.arch``, SDPA attention) over ``tokenizer``'s
    vocabulary, its special tokens in the model and generation configs."""
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


def lr_factor(step: int, progress: float, cfg) -> float:
    """Linear warmup over steps, then cosine from 1 to min_lr_ratio over ``progress`` in [0, 1]."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    cos = 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cos


def train_config(cfg) -> TrainConfig:
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

    def __init__(self, cfg, acc, model, tokenizer, train_ids, val_ids, split):
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
