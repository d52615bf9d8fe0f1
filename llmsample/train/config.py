"""TrainConfig: the bookkeeping knobs every trainer shares, validated on construction.

    @dataclass
    class MyConfig(TrainConfig):        # a method's config adds its own fields ...
        steps: int = help_field("optimizer steps", 500)   # ... and may change a default
        width: int = help_field("hidden units", 64)

        def __post_init__(self) -> None:
            super().__post_init__()      # the shared checks, then the method's own
            ...

Every field is a YAML key and a ``--flag`` of the recipes (:func:`llmsample.config.parse_config`).
:class:`llmsample.train.base.Trainer` reads these fields; ``RESUMABLE_FIELDS`` names the ones
that may differ from a checkpoint's config when a run resumes (budgets, intervals, display:
nothing that changes what is trained; see :func:`llmsample.train.checkpoints.check_resume`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from llmsample.config import help_field

__all__ = ["TrainConfig"]


@dataclass
class TrainConfig:
    """Steps, optimizer basics, checkpoints, logging, budget: what a :class:`Trainer` loop reads."""

    steps: int = help_field("optimizer steps", 100)
    seed: int = help_field("seed of the run's random choices", 0)
    lr: float = help_field("AdamW learning rate", 1e-3)
    weight_decay: float = help_field("AdamW weight decay", 0.0)
    max_grad_norm: float = help_field("gradient clipping norm (0 = off)", 1.0)
    out_dir: str = help_field("checkpoints and metrics.jsonl go here", "out/train")
    save_every: int = help_field("checkpoint every this many steps (0 = only at the end)", 50)
    keep_checkpoints: int = help_field("checkpoints kept on disk", 2)
    log_every: int = help_field("log training metrics every this many steps", 10)
    eval_every: int = help_field("run the evaluation every this many steps (0 = end only)", 0)
    report_to: str = help_field(
        "accelerate trackers: none | all | tensorboard | wandb | ...", "none"
    )
    max_minutes: float = help_field(
        "stop (with a checkpoint and an export) after this wall time (0 = no limit)", 0.0
    )
    progress: bool = help_field("show a progress bar", True)
    overwrite: bool = help_field(
        "start fresh: delete out_dir's checkpoints and metrics.jsonl instead of resuming", False
    )

    # Fields that may differ from the checkpoint's when a run resumes (budgets, intervals,
    # display); any other change is refused (llmsample.train.checkpoints.check_resume).
    RESUMABLE_FIELDS = (
        "steps",
        "max_minutes",
        "log_every",
        "eval_every",
        "save_every",
        "keep_checkpoints",
        "report_to",
        "progress",
        "out_dir",
        "overwrite",
    )

    def __post_init__(self) -> None:
        fixes = {
            "steps": "at least one optimizer step",
            "log_every": "log every N >= 1 steps",
            "keep_checkpoints": "keep at least the newest checkpoint",
            "save_every": "use 0 to save only at the end",
            "eval_every": "use 0 to evaluate only at the end",
        }
        for name, low in (("steps", 1), ("log_every", 1), ("keep_checkpoints", 1)):
            _check_int(self, name, low, fixes[name])
        for name in ("save_every", "eval_every"):
            _check_int(self, name, 0, fixes[name])
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not (isinstance(self.lr, int | float) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be > 0, got {self.lr!r}; pass a positive learning rate")
        for name, fix in (
            ("weight_decay", "use 0 for no weight decay"),
            ("max_grad_norm", "use 0 for no clipping"),
            ("max_minutes", "use 0 for no time limit"),
        ):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and value >= 0):  # NaN fails too
                raise ValueError(f"{name} must be >= 0, got {value!r}; {fix}")
        if not isinstance(self.report_to, str) or not self.report_to:
            raise ValueError(
                f"report_to must name accelerate trackers or be 'none', got {self.report_to!r}"
            )


def _check_int(cfg, name: str, low: int, fix: str) -> None:
    value = getattr(cfg, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}; {fix}")
