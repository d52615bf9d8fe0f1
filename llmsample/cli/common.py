"""What the llmsample command's subcommands share: the usage error, notes on stderr,
torch's thread count, loading the model from the flags, and the chat switch.

    from llmsample.cli.common import UsageError, load_for_cli, note, set_threads, use_chat
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["UsageError", "note", "set_threads", "use_chat", "hub_notice", "load_for_cli"]


class UsageError(Exception):
    """A user mistake: printed as one line, exit status 2."""


def note(text: str) -> None:
    """One line on stderr, for things the user should know but that are not errors."""
    print(f"llmsample: {text}", file=sys.stderr)


def set_threads(args) -> int:
    """Pick torch's CPU thread count deliberately (see --threads) and return it."""
    import torch

    n = args.threads
    if n is None:
        env = os.environ.get("OMP_NUM_THREADS", "")
        n = int(env) if env.isdigit() and int(env) > 0 else max(1, (os.cpu_count() or 2) // 2)
    if n < 1:
        raise UsageError(f"--threads must be >= 1, got {n}")
    torch.set_num_threads(n)
    return n


def use_chat(args, tokenizer) -> bool:
    """--chat / --no-chat, or (by default) whether the tokenizer has a chat template."""
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if args.chat and not has_template:
        raise UsageError(
            f"--chat: the tokenizer of {args.model!r} has no chat template; drop --chat"
        )
    return has_template if args.chat is None else args.chat


def hub_notice(what: str, name: str) -> None:
    """Say so before from_pretrained goes to the hub: offline, it retries for a while."""
    from llmsample.hf.loading import EMBEDDED
    from llmsample.hf.named_models import NAMED

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    if offline or name in EMBEDDED or name in NAMED or Path(name).expanduser().exists():
        return
    note(
        f"{what} {name!r} is not a local folder or a known model name: contacting the Hugging "
        "Face hub (set HF_HUB_OFFLINE=1 to fail fast when offline)"
    )


def load_for_cli(args):
    """load_model from the flags; a failure becomes a one-line UsageError."""
    import llmsample
    from llmsample.hf.loading import check_device, quiet_hub_progress

    try:
        check_device(args.device)
    except ValueError as err:
        raise UsageError(f"--device: {err}") from None
    hub_notice("--model", args.model)
    if args.adapter is not None:
        hub_notice("--adapter", args.adapter)
    quiet_hub_progress()  # keep the terminal for our own output
    try:
        return llmsample.load_model(args.model, adapter=args.adapter, device=args.device)
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(str(err)) from None
