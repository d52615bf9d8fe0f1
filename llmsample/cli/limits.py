"""Checks before ``llmsample generate`` decodes: memory for the particles, and the length
the model was trained at.

    llmsample generate "ROMEO:" --particles 100000000   # refused: more than the RAM
    llmsample generate "ROMEO:" --max-new-tokens 900    # a note: past the trained windows

    from llmsample.cli.limits import decode_memory, memory_limit
    decode_memory(model, rows=32, length=64)   # bytes, roughly
    memory_limit("cpu")                        # (bytes, "RAM") or None

An estimate beyond the limit is a :class:`~llmsample.cli.common.UsageError`; beyond half
of it, or a prompt past the trained length, is a note on stderr.
"""

from __future__ import annotations

import os
from pathlib import Path

from llmsample.cli.common import UsageError, note

__all__ = ["decode_memory", "memory_limit", "check_memory", "check_length"]


def decode_memory(model, rows: int, length: int, kv_copies: int = 1) -> int:
    """Bytes that decoding ``rows`` sequences of ``length`` tokens holds, roughly: per row,
    four fp32 next-token arrays of V floats (logits, log p, log q, q) and the KV cache,
    layers x (K, V) x kv_dim x length x dtype bytes, twice (resampling copies it)."""
    from llmsample.hf.session import vocab_size

    cfg = model.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 0) or 0
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 0) or 0
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", 1) or 1
    kv_dim = (getattr(cfg, "num_key_value_heads", None) or heads) * (
        getattr(cfg, "head_dim", None) or hidden // heads
    )
    dtype_bytes = next(model.parameters()).element_size()
    kv = layers * 2 * kv_dim * length * dtype_bytes
    return rows * (4 * 4 * vocab_size(model) + 2 * kv_copies * kv)


def memory_limit(device: str) -> tuple[int, str] | None:
    """(bytes, what) that decoding may use: free GPU memory on CUDA, else the physical
    RAM (or a smaller cgroup limit); None when unknown."""
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(torch.device(device))[0], "free GPU memory"
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        total = min(total, int(limit)) if limit.isdigit() else total
    except OSError:
        pass
    return total, "RAM"


def check_memory(args, model, prompt_tokens: int) -> None:
    """Refuse --particles whose estimate exceeds the memory; note one past half of it."""
    from llmsample.hf.session import context_length

    rows, length = args.particles, prompt_tokens + args.max_new_tokens
    if length > (context_length(model) or length):
        return  # beyond the context is a hard error of its own, reported by the sampler
    need = decode_memory(model, rows, length, kv_copies=2 if args.adapter else 1)
    limit = memory_limit(args.device)
    if limit is None:
        return
    have, what = limit
    gb = f"about {need / 1e9:.1f} GB (KV cache and next-token arrays)"
    if need > have:
        raise UsageError(
            f"--particles {rows} needs {gb}, more than the {have / 1e9:.1f} GB of {what}; "
            "lower --particles or --max-new-tokens"
        )
    if need > have / 2:
        note(f"warning: --particles {rows} needs {gb} of the {have / 1e9:.1f} GB of {what}")


def check_length(args, model, tok, prompt_tokens: int) -> None:
    """Warn when prompt + continuation run past the length the model was trained at."""
    from llmsample.hf.loading import trained_length
    from llmsample.hf.session import context_length

    total, limit = prompt_tokens + args.max_new_tokens, context_length(model)
    trained = trained_length(model, tok)
    if trained is None or total <= trained or (limit is not None and total > limit):
        return  # beyond the context is a hard error later
    note(
        f"warning: prompt ({prompt_tokens} tokens) + --max-new-tokens {args.max_new_tokens} = "
        f"{total} tokens, more than the {trained}-token windows {args.model!r} was trained "
        "on; the text may degrade (shorten the prompt or lower --max-new-tokens)"
    )
