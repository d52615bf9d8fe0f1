"""GFlowNet fine-tuning of a LoRA policy that samples sigma(x|c) ∝ p_base(x|c) phi(x,c).

    from llmsample.gfn import GFNConfig, GFNTrainer, add_lora
    policy = add_lora(model, cfg)
    GFNTrainer(policy, tokenizer, prompts, potential, cfg).train()

See :mod:`llmsample.gfn.trainer` for the algorithm and :mod:`llmsample.gfn.losses`
for the objectives (pure tensor functions).
"""

from llmsample.gfn.config import GFNConfig
from llmsample.gfn.flow_twist import FlowTwist, flow_log_psi
from llmsample.gfn.losses import prefix_flows, subtrajectory_balance, trajectory_balance, vargrad
from llmsample.gfn.replay import ReplayBuffer
from llmsample.gfn.reward import BaseView, log_rewards, policy_diagnostics
from llmsample.gfn.rollout import Rollouts, sample_rollouts
from llmsample.gfn.teacher import smc_demonstrations
from llmsample.gfn.trainer import GFNTrainer, LogZ, add_lora

__all__ = [
    "BaseView",
    "FlowTwist",
    "GFNConfig",
    "GFNTrainer",
    "LogZ",
    "ReplayBuffer",
    "Rollouts",
    "add_lora",
    "flow_log_psi",
    "log_rewards",
    "policy_diagnostics",
    "prefix_flows",
    "sample_rollouts",
    "smc_demonstrations",
    "subtrajectory_balance",
    "trajectory_balance",
    "vargrad",
]
