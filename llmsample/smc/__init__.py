"""Sequential Monte Carlo over token prefixes: the config, the engine and resampling.

from llmsample.smc import SMCConfig, run_smc
"""

from llmsample.smc.engine import SMCConfig, run_smc

__all__ = ["SMCConfig", "run_smc"]
