"""Evaluation, export and the final report of ``recipes/pretrain_tiny_lm.py``.

    python recipes/pretrain_tiny_lm.py --config recipes/configs/pretrain_tiny_lm.yaml

:func:`evaluate` is the held-out loss (mean NLL per BPE token, so ``exp`` of it is the
validation perplexity); :func:`export_fp16` writes the finished model with its tokenizer
for the Auto classes; :func:`final_metrics` is the run's ``metrics.json`` (with
:func:`machine_info`, what it ran on). Every ``cfg`` here is the recipe's ``PretrainConfig``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from llmsample.provenance import machine
from llmsample.train.checkpoints import signal_stop

__all__ = ["evaluate", "export_fp16", "machine_info", "final_metrics"]


@torch.no_grad()
def evaluate(
    model,
    accelerator: Accelerator,
    val_ids: torch.Tensor,
    cfg,
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


def machine_info(accelerator: Accelerator) -> dict:
    """:func:`llmsample.provenance.machine` plus the accelerator's device, processes and
    precision."""
    import accelerate

    return machine() | {
        "device": str(accelerator.device),
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "accelerate": accelerate.__version__,
    }


def final_metrics(cfg, t, result: dict, n_train: int) -> dict:
    """``metrics.json``: the final validation (null unless the run finished), the budget
    spent, how the run stopped, the machine and the config. ``t`` is the recipe's
    ``PretrainTrainer`` whose ``train()`` returned ``result``; ``n_train`` the training
    tokens. ``wall_seconds_this_invocation`` is left for the caller, who times it all."""
    step, finished = t.step, result["finished"]
    if not finished:
        stop_reason = f"signal {result['stopped_by']}"
    else:
        stop_reason = "max_steps" if step >= cfg.max_steps else "max_minutes"
    return {
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
        "stopped_by_signal": signal_stop(result["stopped_by"], step),
        "val_step": result["eval_step"] if finished else None,  # of final_val_* and export
        "resumed_from_step": t.resumed_from,
        "n_params": t.n_params,
        "train_tokens": n_train,
        "heldout_plays": t.split["heldout_plays"],
        "machine": machine_info(t.acc),
        "config": dataclasses.asdict(cfg),
        **t.export_info,
    }
