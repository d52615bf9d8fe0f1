"""Where a result came from: the command, the git commit and the machine.

Every results file (recipe ``summary.json``, eval ``summary.json``/``results.md``) records
this, so a figure can be traced to the code that made it and rerun
(``python -m evals.reproduce`` reruns the cheap ones and compares)::

    from llmsample.provenance import provenance
    summary["provenance"] = provenance("python recipes/gfn_lora.py --config ...")
    summary["machine"] = machine() | {"device": "cpu"}   # benchmarks add their own keys
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib.metadata import version
from pathlib import Path

import torch

__all__ = ["provenance", "git_commit", "machine", "NOT_CODE"]

_REPO = Path(__file__).resolve().parent.parent
# edits here leave results unchanged (the trained adapters and twist heads beside
# evals/artifacts/results are inputs of results: they count as code)
NOT_CODE = ("evals/artifacts/results", "benchmarks/results", "*.md")


def git_commit(repo: Path = _REPO) -> dict:
    """``{"commit": sha or None, "dirty": bool or None}`` of the checkout holding this
    package; ``dirty``: a tracked file other than results and Markdown (:data:`NOT_CODE`)
    differs from the commit. Both None outside a git checkout (a wheel) or without git."""
    try:
        run = dict(cwd=repo, capture_output=True, text=True, timeout=10, check=True)
        sha = subprocess.run(["git", "rev-parse", "HEAD"], **run).stdout.strip()
        # tracked files that can change a result: not untracked scratch files, not the
        # results and docs themselves (rewriting one result must not taint the next)
        spec = ["--", ".", *(f":(exclude){p}" for p in NOT_CODE)]
        status = subprocess.run(["git", "status", "--porcelain", "-uno", *spec], **run).stdout
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


def _cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """The machine and software a measurement ran on (benchmarks and recipes add their
    device, dtype or accelerator settings): platform, python, cpu (model name), cpu_count,
    torch_threads, torch and transformers versions, load averages over 1, 5, 15 min."""
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()],
    }
