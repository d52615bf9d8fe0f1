"""GFNConfig: every knob of GFlowNet LoRA fine-tuning, validated on construction.

    cfg = GFNConfig(loss="tb", steps=500, samples_per_prompt=16, out_dir="out/gfn")

The bookkeeping fields (steps, seed, lr, out_dir, save_every, eval_every, max_minutes,
overwrite, ...) and their checks come from :class:`llmsample.train.config.TrainConfig`.
YAML files and command-line flags map onto it through :func:`llmsample.config.parse_config`
(recipes subclass it to add the task and model fields).
"""

from __future__ import annotations

from dataclasses import dataclass

from llmsample.config import help_field
from llmsample.train.config import TrainConfig

__all__ = ["GFNConfig", "LOSSES", "ROLLOUT_DTYPES"]

LOSSES = ("tb", "vargrad", "subtb")
ROLLOUT_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class GFNConfig(TrainConfig):
    """Knobs of :class:`llmsample.gfn.GFNTrainer`; ``RESUMABLE_FIELDS`` are TrainConfig's
    plus ``activation_checkpointing`` (a new ``steps`` also stretches the epsilon schedule
    over the new length)."""

    RESUMABLE_FIELDS = (*TrainConfig.RESUMABLE_FIELDS, "activation_checkpointing")

    # objective
    loss: str = help_field("tb (trajectory balance) | vargrad | subtb (modified sub-TB)", "tb")
    log_z: str = help_field(
        "tb only: 'scalar' log Z, or 'prompt' (a linear head on the prompt)", "scalar"
    )
    subtb_lambda: float = help_field("subtb: weight lambda^(j-i) of a sub-trajectory i..j", 1.0)
    # reward
    base_in_reward: bool = help_field(
        "log R = log p_base + log phi (True: sigma ∝ p_base phi) or log phi alone (False)", True
    )
    reward_temperature_start: float = help_field("reward is R^(1/tau); tau at step 0", 1.0)
    reward_temperature_end: float = help_field(
        "tau after the schedule (1 = the true posterior)", 1.0
    )
    reward_temperature_steps: int = help_field(
        "steps of linear tau annealing (0 = constant end)", 0
    )
    # batch and optimization
    steps: int = help_field("optimizer steps", 200)
    prompts_per_step: int = help_field("prompts per micro-batch", 1)
    samples_per_prompt: int = help_field("K sequences per prompt per micro-batch", 16)
    gradient_accumulation_steps: int = help_field("micro-batches per optimizer step", 1)
    max_new_tokens: int = help_field("T: sequences end at a stop token or after T tokens", 16)
    chat: bool = help_field(
        "prompts are user messages: encode them with the tokenizer's chat template", False
    )
    lr: float = help_field("learning rate of the LoRA weights", 1e-3)
    log_z_lr: float = help_field("learning rate of log Z (scalar or head)", 0.1)
    weight_decay: float = help_field("AdamW weight decay of the LoRA weights", 0.0)
    warmup_steps: int = help_field("linear learning-rate warmup steps", 10)
    mixed_precision: str = help_field("no | bf16 | fp16 (accelerate autocast)", "no")
    activation_checkpointing: bool = help_field(
        "recompute each decoder layer in the backward of the scoring pass instead of keeping "
        "its activations (same log q and gradients; less memory, one more forward)",
        False,
    )
    rollout_dtype: str = help_field(
        "float32: sample the fresh rollouts with the policy itself; bfloat16 | float16: with "
        "a frozen copy of it in that dtype, its LoRA merged in and synced each step (faster "
        "cached decoding "
        "on CPUs with bf16 matmuls; the losses still score every row under the policy, so "
        "only which sequences are explored changes, and the losses stay exact off-policy)",
        "float32",
    )
    # LoRA
    lora_rank: int = help_field("LoRA rank r", 8)
    lora_alpha: float = help_field("LoRA alpha (scale alpha / r)", 16.0)
    target_modules: list[str] = help_field(
        "modules to adapt; ['all-linear'] = every linear", ["all-linear"]
    )
    modules_to_save: list[str] = help_field(
        "small modules trained in full beside the LoRA (e.g. the final norm: ['ln_f'] for "
        "GPT-2, ['model.norm'] for Llama: peft matches name suffixes, so ['norm'] would also "
        "train every layer's input_layernorm and post_attention_layernorm); saved with the adapter",
        [],
    )
    # exploration
    tempered_fraction: float = help_field("share of steps sampled at a random temperature", 0.5)
    temperature_min: float = help_field("lowest exploration temperature", 0.7)
    temperature_max: float = help_field("highest exploration temperature", 2.0)
    epsilon_start: float = help_field("epsilon-uniform mixing at step 0", 0.05)
    epsilon_end: float = help_field("epsilon-uniform mixing at the last step (linear)", 0.0)
    replay_fraction: float = help_field("share of each prompt's K drawn from replay", 0.25)
    replay_capacity: int = help_field("distinct sequences kept per prompt (top reward)", 512)
    replay_temperature: float = help_field("replay picks x with prob. prop. to R(x)^(1/this)", 1.0)
    # bookkeeping (TrainConfig's fields, with this method's defaults and help)
    seed: int = help_field("seed of sampling, replay and initialization", 0)
    out_dir: str = help_field("checkpoints, metrics.jsonl and the final adapter go here", "out/gfn")
    eval_every: int = help_field("evaluate the task every this many steps (0 = end only)", 50)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.log_z not in ("scalar", "prompt"):
            raise ValueError(f"log_z must be 'scalar' or 'prompt', got {self.log_z!r}")
        if self.loss == "vargrad" and self.samples_per_prompt < 2:
            raise ValueError("vargrad needs samples_per_prompt >= 2 (a per-prompt batch mean)")
        positive = ("prompts_per_step", "samples_per_prompt", "max_new_tokens", "lora_rank")
        positive += ("gradient_accumulation_steps", "replay_capacity")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("warmup_steps", "reward_temperature_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("reward_temperature_start", "reward_temperature_end", "log_z_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.temperature_min <= self.temperature_max:
            raise ValueError("need 0 < temperature_min <= temperature_max")
        for name in ("tempered_fraction", "epsilon_start", "epsilon_end", "replay_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.replay_fraction >= 1.0:
            raise ValueError("replay_fraction must be < 1: some samples must be fresh")
        if not 0 < self.subtb_lambda:
            raise ValueError(f"subtb_lambda must be > 0, got {self.subtb_lambda}")
        if self.rollout_dtype not in ROLLOUT_DTYPES:
            raise ValueError(
                f"rollout_dtype must be one of {ROLLOUT_DTYPES}, got {self.rollout_dtype!r}"
            )
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(
                f"mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}"
            )

    def reward_temperature(self, step: int) -> float:
        """tau at ``step``: linear from start to end over reward_temperature_steps."""
        n = self.reward_temperature_steps
        if n == 0 or step >= n:
            return self.reward_temperature_end
        a = step / n
        return (1 - a) * self.reward_temperature_start + a * self.reward_temperature_end

    def epsilon(self, step: int) -> float:
        a = step / max(self.steps - 1, 1)
        return (1 - a) * self.epsilon_start + a * self.epsilon_end
