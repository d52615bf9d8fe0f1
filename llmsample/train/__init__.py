"""Training machinery shared by every method: the config, the loop, checkpoints.

    from llmsample.train import TrainConfig, Trainer

:mod:`llmsample.train.config` (TrainConfig: steps, budgets, intervals, out_dir, ...),
:mod:`llmsample.train.base` (Trainer: resume, logs, evaluation, checkpoints, stop signals;
a method implements its step) and :mod:`llmsample.train.checkpoints` (the files).
"""

from llmsample.train.base import Trainer, make_accelerator
from llmsample.train.config import TrainConfig

__all__ = ["TrainConfig", "Trainer", "make_accelerator"]
