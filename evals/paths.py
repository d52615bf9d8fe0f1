"""Where the evals' artifacts live: everything under ``evals/artifacts/``, apart from the code.

- ``ADAPTERS`` (``evals/artifacts/adapters/<task>``): GFlowNet LoRA policies trained by
  ``recipes/configs/gfn_<task>.yaml``, one per task;
- ``TWISTS`` (``evals/artifacts/twists/<task>``): CTL twist heads trained by
  ``recipes/configs/twist_ctl_<task>.yaml``, one per task;
- ``RESULTS`` (``evals/artifacts/results/<name>``): the committed result folders (cells,
  ``summary.json``, ``results.md``, plots) that the READMEs cite and ``evals.reproduce``
  compares against.

Until issue 16 they sat directly under ``evals/`` (``evals/adapters``, ``evals/twists``,
``evals/results``); :func:`refuse_old` turns such a path from a user into an error that
names the new one, instead of a fresh folder beside the code or a missing file.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["EVALS", "ARTIFACTS", "ADAPTERS", "TWISTS", "RESULTS", "refuse_old"]

EVALS = Path(__file__).resolve().parent
ARTIFACTS = EVALS / "artifacts"
ADAPTERS = ARTIFACTS / "adapters"
TWISTS = ARTIFACTS / "twists"
RESULTS = ARTIFACTS / "results"
_OLD = {EVALS / p.name: p for p in (ADAPTERS, TWISTS, RESULTS)}


def refuse_old(path: str | Path, flag: str = "the path") -> None:
    """Raise SystemExit naming the new location when ``path`` is (under) one of the old
    artifact folders ``evals/{adapters,twists,results}``; return quietly otherwise."""
    given, path = path, Path(path).resolve()
    for old, new in _OLD.items():
        if path == old or old in path.parents:
            moved = new / path.relative_to(old)
            try:
                shown = moved.relative_to(Path.cwd())
            except ValueError:
                shown = moved
            raise SystemExit(
                f"{flag} {given} is in evals/{old.name}, which moved to "
                f"evals/artifacts/{old.name} (issue 16): use {shown}"
            )
