"""Sequential Monte Carlo over token prefixes.

- ``config``: :class:`SMCConfig`, the engine's knobs;
- ``state``: the run state (tokens, weights, twist values) carried between steps;
- ``steps``: score, reweight, resample, finalize (backend-free);
- ``engine``: :func:`run_smc` on a Hugging Face model (propose, then the steps);
- ``conditional``: free or reference-clamped ancestry (conditional SMC);
- ``resampling``: the resampling schemes and ESS.

    from llmsample.smc import SMCConfig, run_smc
"""

from llmsample.smc.config import SMCConfig
from llmsample.smc.engine import run_smc

__all__ = ["SMCConfig", "run_smc"]
