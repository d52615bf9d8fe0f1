"""SMCConfig: the knobs of the SMC engine, validated on construction.

from llmsample.smc.config import SMCConfig
cfg = SMCConfig(num_particles=32, max_new_tokens=24, resample_every=4)
"""

from __future__ import annotations

from dataclasses import dataclass

from llmsample.config import help_field
from llmsample.smc.resampling import SCHEMES

__all__ = ["SMCConfig"]


@dataclass
class SMCConfig:
    """Knobs of the SMC engine (validated on construction)."""

    num_particles: int = help_field("particles N per prompt", 16)
    max_new_tokens: int = help_field("T: a continuation ends at EOS or after T tokens", 32)
    resampling: str = help_field("multinomial | stratified | systematic | residual", "systematic")
    ess_threshold: float = help_field(
        "resample a prompt's running particles when their ESS / their count < this (finished "
        "particles keep their weights); 0 never resamples (importance sampling), values > 1 "
        "resample at every step",
        0.5,
    )
    resample_every: int = help_field(
        "K: resampling is considered only after tokens K, 2K, ... (particles advance K "
        "tokens between resampling steps; the times are fixed in advance, so the weights "
        "stay exact)",
        1,
    )
    align_blocks: bool = help_field(
        "block SMC on a backend with a prefix cache (vLLM): resize each prompt's first "
        "block (K/2 to 3K/2 tokens) so that block ends fall where the cache serves all of a "
        "particle's prefix but one token (every end when resample_every is a multiple of "
        "the KV block size); exact either way, only faster; ignored by the token engine",
        True,
    )
    seed: int | None = help_field("seed for proposals and resampling; None uses torch's RNG", None)
    reweight: bool = help_field(
        "False returns plain draws from the proposal (uniform weights, no log Z)", True
    )
    progress: bool = help_field("show a progress bar over decoding steps", False)
    stop_guard: bool = help_field(
        "never propose EOS where the potential rejects the reply as it stands (phi = 0): "
        "sigma has no mass there, so the weights stay exact; costs one potential.complete "
        "call per step, so meant for cheap hard constraints",
        False,
    )

    def __post_init__(self):
        if not isinstance(self.num_particles, int) or self.num_particles < 1:
            raise ValueError(f"num_particles must be an integer >= 1, got {self.num_particles!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if self.resampling not in SCHEMES:
            raise ValueError(
                f"unknown resampling scheme {self.resampling!r}; choose from {sorted(SCHEMES)}"
            )
        k = self.resample_every
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"resample_every must be an integer >= 1, got {self.resample_every!r}")
        if not isinstance(self.align_blocks, bool):
            raise ValueError(f"align_blocks must be True or False, got {self.align_blocks!r}")
        if not self.ess_threshold >= 0:
            raise ValueError(f"ess_threshold must be >= 0, got {self.ess_threshold}")
