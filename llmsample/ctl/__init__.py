"""Twisted SMC trained by contrastive twist learning (CTL): the loss, the head, the trainer.

from llmsample.ctl import CTLConfig, CTLTrainer, LearnedTwist
"""

from llmsample.ctl.config import CTLConfig
from llmsample.ctl.head import LearnedTwist, TwistHead, text_features
from llmsample.ctl.loss import base_states, ctl_loss, lengths_of
from llmsample.ctl.trainer import CTLTrainer, train_ctl

__all__ = [
    "ctl_loss",
    "base_states",
    "lengths_of",
    "TwistHead",
    "LearnedTwist",
    "text_features",
    "CTLConfig",
    "CTLTrainer",
    "train_ctl",
]
