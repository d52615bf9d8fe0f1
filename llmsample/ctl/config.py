"""CTLConfig: every knob of contrastive twist learning (:class:`llmsample.ctl.CTLTrainer`).

    cfg = CTLConfig(steps=300, num_particles=64, negatives="twisted", out_dir="out/ctl")

The bookkeeping fields (steps, seed, lr, out_dir, save_every, eval_every, max_minutes,
overwrite, ...) and their checks come from :class:`llmsample.train.config.TrainConfig`;
``RESUMABLE_FIELDS`` too (a new ``steps`` also stretches the cosine learning-rate
schedule over the new length). YAML files and flags map onto it through
:func:`llmsample.config.parse_config`.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmsample.config import help_field
from llmsample.train.config import TrainConfig

__all__ = ["CTLConfig"]


@dataclass
class CTLConfig(TrainConfig):
    """Knobs of :class:`llmsample.ctl.CTLTrainer` (validated on construction)."""

    steps: int = help_field("optimizer steps", 300)
    prompts_per_step: int = help_field("prompts per step", 2)
    num_particles: int = help_field(
        "positives: SMC particles (or IS draws) per prompt per step", 64
    )
    num_negatives: int = help_field("negatives: draws per prompt per step", 128)
    negatives: str = help_field(
        "twisted: draws from q ∝ p·psi (covers where psi is large: self-correcting) | "
        "base: ancestral draws from p | sampled: draws from p, scored at their sampled "
        "token only and pooled with the positives (a bounded loss; one potential call per "
        "draw instead of one per draw and step)",
        "twisted",
    )
    positives: str = help_field(
        "smc (SMC with the current twist) | importance (no resampling) | given (the exact "
        "posterior sample passed per prompt as references=, e.g. joint_infill_samples)",
        "smc",
    )
    proposal: str = help_field(
        "proposal of the positive runs: base (p) | optimal (q ∝ p·psi)", "base"
    )
    ess_threshold: float = help_field("resampling threshold of the positive SMC runs", 0.5)
    max_new_tokens: int = help_field("T: continuations end at EOS or after T tokens", 32)
    lr: float = help_field("AdamW learning rate of the head", 3e-3)
    lr_schedule: str = help_field("constant | cosine (decays to 0 at the last step)", "cosine")
    weight_decay: float = help_field("AdamW weight decay of the head", 0.0)
    seed: int = help_field("seed of prompt choice and sampling", 0)
    out_dir: str = help_field(
        "checkpoints, metrics.jsonl and twist_head.pt go here", "out/twist_ctl"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("prompts_per_step", "num_particles", "num_negatives"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 2:
            raise ValueError(
                f"max_new_tokens must be an integer >= 2 (a twist acts between steps), "
                f"got {self.max_new_tokens!r}"
            )
        if self.positives not in ("smc", "importance", "given"):
            raise ValueError(
                f"positives must be 'smc', 'importance' or 'given', got {self.positives!r}"
            )
        if self.negatives not in ("twisted", "base", "sampled"):
            raise ValueError(
                f"negatives must be 'twisted', 'base' or 'sampled', got {self.negatives!r}"
            )
        if self.proposal not in ("base", "optimal"):
            raise ValueError(f"proposal must be 'base' or 'optimal', got {self.proposal!r}")
        if not self.ess_threshold >= 0:
            raise ValueError(f"ess_threshold must be >= 0, got {self.ess_threshold}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(
                f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}"
            )
