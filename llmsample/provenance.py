"""Where a result came from: the command, the git commit and the machine.

Every results file (recipe ``summary.json``, eval ``summary.json``/``results.md``) records
this, so a figure can be traced to the code that made it and rerun
(``python -m evals.reproduce`` reruns the cheap ones and compares)::

    from llmsample.provenance import provenance
    summary["provenance"] = provenance("python recipes/gfn_lora.py --config ...")
"""

from __future__ import annotations

import platform
import subprocess
from importlib.metadata import version
from pathlib import Path

import torch

__all__ = ["provenance", "git_commit"]

_REPO = Path(__file__).resolve().parent.parent


def git_commit(repo: Path = _REPO) -> dict:
    """``{"commit": sha or None, "dirty": bool or None}`` of the checkout holding this
    package; both None outside a git checkout (an installed wheel) or without git."""
    try:
        run = dict(cwd=repo, capture_output=True, text=True, timeout=10, check=True)
        sha = subprocess.run(["git", "rev-parse", "HEAD"], **run).stdout.strip()
        # tracked files only: untracked scratch files do not change what the code does
        status = subprocess.run(["git", "status", "--porcelain", "-uno"], **run).stdout
    except (OSError, subprocess.SubprocessError):
        return dict(commit=None, dirty=None)
    return dict(commit=sha, dirty=bool(status.strip()))


def provenance(command: str) -> dict:
    """The command as a user would type it, the commit (``dirty`` when tracked files
    differ from it) and the software and machine it ran on."""
    return dict(
        command=command,
        **git_commit(),
        python=platform.python_version(),
        torch=torch.__version__,
        transformers=version("transformers"),
        cpu=platform.processor() or platform.machine(),
        threads=torch.get_num_threads(),
    )
