"""GFlowNet objectives for an autoregressive policy, as pure tensor functions.

    from llmsample.gfn.losses import trajectory_balance, vargrad, subtrajectory_balance

Notation: a prompt c, a complete continuation x, the policy q_theta, the reward
R(x) = p_base(x|c) phi(x,c) (tempered or not: the losses only see log R), and
sigma(x|c) = R(x)/Z(c). For a sequence, ``log_q`` is sum_t log q_theta(x_t | c, x_<t)
over its tokens (EOS included). Batches hold K samples for each of B prompts.

Each loss is >= 0 and is exactly 0 when q_theta = sigma (with log Z = log Z(c) where
one is learned): ``tests/test_gfn_losses.py`` checks both on enumerable problems.
No transformers import here.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["trajectory_balance", "vargrad", "subtrajectory_balance", "prefix_flows"]


def trajectory_balance(log_q: Tensor, log_reward: Tensor, log_z: Tensor) -> Tensor:
    """Trajectory balance (Malkin et al. 2022), mean over the batch:

        L = mean_{b,k} (log Z(c_b) + log q(x_bk | c_b) - log R(x_bk))^2

    ``log_q``, ``log_reward``: [B, K]. ``log_z``: [] (one scalar for every prompt) or
    [B] (a prompt-conditioned head). Gradients flow into ``log_q`` and ``log_z``.
    """
    if log_z.dim() == 0:
        log_z = log_z.expand(log_q.shape[0])
    residual = log_z[:, None] + log_q - log_reward  # [B, K]
    return residual.pow(2).mean()


def vargrad(log_q: Tensor, log_reward: Tensor) -> tuple[Tensor, Tensor]:
    """VarGrad (Richter et al. 2020; Zhang et al. 2023): TB with log Z replaced by
    its stop-gradient batch estimate over the K samples of each prompt,

        log Z_hat(c_b) = sg( mean_k (log R(x_bk) - log q(x_bk | c_b)) )
        L = mean_{b,k} (log Z_hat(c_b) + log q(x_bk | c_b) - log R(x_bk))^2

    i.e. the per-prompt variance of log q - log R. Needs K >= 2. Returns ``(loss,
    log_z_hat [B])``; ``log_z_hat`` is a lower-bound-style estimate of log Z(c).
    """
    if log_q.shape[1] < 2:
        raise ValueError("vargrad needs K >= 2 samples per prompt")
    delta = log_reward - log_q  # [B, K]
    log_z_hat = delta.mean(dim=1).detach()  # [B]
    residual = log_z_hat[:, None] - delta  # [B, K]
    return residual.pow(2).mean(), log_z_hat


def prefix_flows(log_q_tok: Tensor, log_q_stop: Tensor, log_reward_stop: Tensor) -> Tensor:
    """u_i = log R(x_1:i T) - log q(T | x_1:i) - sum_{k<=i} log q(x_k | x_<k).

    ``log_q_tok`` [N, L]: log q of the L non-terminal tokens x_1..x_L (0 past a row's
    end); ``log_q_stop`` [N, L+1]: log q of terminating right after prefix x_1:i,
    i = 0..L (0 where termination is forced, e.g. a cut at max length);
    ``log_reward_stop`` [N, L+1]: log R of the prefix x_1:i terminated there.
    Returns u [N, L+1]; log F(x_1:i) = u_i + sum_{k<=i} log q(x_k|.) is the implied flow.
    At q = sigma every valid u_i equals log Z(c).
    """
    cum = torch.nn.functional.pad(log_q_tok.cumsum(dim=1), (1, 0))  # [N, L+1]
    return log_reward_stop - log_q_stop - cum


def subtrajectory_balance(
    log_q_tok: Tensor,
    log_q_stop: Tensor,
    log_reward_stop: Tensor,
    mask: Tensor,
    lam: float = 1.0,
) -> Tensor:
    """Modified sub-trajectory balance (Hu et al. 2024), where every prefix may stop.

    For a sequence x_1..x_n and 0 <= i < j <= n:

        delta_ij = log R(x_1:i T) + sum_{k=i+1..j} log q(x_k | x_<k) + log q(T | x_1:j)
                   - log R(x_1:j T) - log q(T | x_1:i)
                 = u_i - u_j          (u from :func:`prefix_flows`)

        L = sum_{i<j} lam^(j-i) delta_ij^2 / sum_{i<j} lam^(j-i), averaged over rows.

    ``mask`` [N, L+1] marks the valid prefix positions i = 0..n of each row. Shapes as in
    :func:`prefix_flows`. Needs no log Z: it cancels in every delta.
    """
    u = prefix_flows(log_q_tok, log_q_stop, log_reward_stop)  # [N, L+1]
    m = mask.to(u.dtype)
    L1 = u.shape[1]
    pos = torch.arange(L1, device=u.device)
    gap = (pos[None, :] - pos[:, None]).to(u.dtype)  # [L+1, L+1], j - i
    upper = gap > 0
    wgt = torch.where(upper, torch.as_tensor(lam, dtype=u.dtype).pow(gap), 0.0)
    pair = wgt[None] * m[:, :, None] * m[:, None, :]  # [N, L+1, L+1]
    delta = u[:, :, None] - u[:, None, :]  # [N, L+1, L+1]
    total = pair.sum(dim=(1, 2)).clamp(min=1e-12)  # [N]; rows of one prefix give 0/eps
    per_row = (pair * delta.pow(2)).sum(dim=(1, 2)) / total
    return per_row.mean()
