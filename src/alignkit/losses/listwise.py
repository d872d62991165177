"""Listwise losses: k responses per prompt with graded scores psi [B, k] (higher is better).

Each response's implicit reward is s_i = beta (l_i - l_ref_i) from summed response log-probs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignkit.losses.base import LossInputs, LossOutput
from alignkit.losses.options import Beta, LossOptions


def _rewards_and_scores(inputs: LossInputs, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    if inputs.scores is None:
        raise ValueError("this loss needs graded scores [B, k] but none were given")
    return beta * (inputs.logps - inputs._ref()), inputs.scores.to(inputs.logps.dtype)


def _list_metrics(rewards: torch.Tensor, scores: torch.Tensor) -> dict[str, torch.Tensor]:
    better = scores.unsqueeze(2) > scores.unsqueeze(1)  # [B, k, k]: response i is scored above response j
    gaps = rewards.unsqueeze(2) - rewards.unsqueeze(1)
    right = better * ((gaps > 0).to(rewards.dtype) + 0.5 * (gaps == 0).to(rewards.dtype))
    pairs = better.sum(dim=(1, 2)).clamp(min=1)
    best = scores.argmax(dim=1, keepdim=True)
    return {
        "rewards/mean": rewards.mean(dim=1).detach(),
        "rewards/best": rewards.gather(1, best).squeeze(1).detach(),
        "rewards/accuracy": (right.sum(dim=(1, 2)) / pairs).detach(),
    }


class LiPOOptions(LossOptions):
    beta: Beta = 0.1


def lipo_lambda_loss(inputs: LossInputs, opts: LiPOOptions) -> LossOutput:
    """l = sum_{psi_i > psi_j} D_ij log(1 + exp(-(s_i - s_j))), D_ij = |G_i - G_j| |1/D(t_i) - 1/D(t_j)|.

    G = 2^psi - 1, D(t) = log2(1 + t), t = 1-based rank of s (descending); D_ij carries no gradient.
    LiPO-lambda, arXiv 2402.01878.
    """
    rewards, scores = _rewards_and_scores(inputs, opts.beta)
    k = rewards.shape[1]
    with torch.no_grad():
        order = torch.argsort(rewards, dim=1, descending=True, stable=True)
        positions = torch.arange(1, k + 1, dtype=rewards.dtype, device=rewards.device).expand_as(rewards)
        ranks = torch.empty_like(rewards).scatter_(1, order, positions)
        inverse_discount = 1 / torch.log2(1 + ranks)
        gains = torch.pow(2.0, scores) - 1
        lambda_weights = (gains.unsqueeze(2) - gains.unsqueeze(1)).abs() * (
            inverse_discount.unsqueeze(2) - inverse_discount.unsqueeze(1)
        ).abs()
        better = scores.unsqueeze(2) > scores.unsqueeze(1)
    pair_losses = F.softplus(-(rewards.unsqueeze(2) - rewards.unsqueeze(1)))
    losses = (lambda_weights * better * pair_losses).sum(dim=(1, 2))
    return losses, _list_metrics(rewards, scores)


class ListMLEOptions(LossOptions):
    beta: Beta = 0.1


def listmle_loss(inputs: LossInputs, opts: ListMLEOptions) -> LossOutput:
    """l = -sum_k [s_pi(k) - log sum_{j >= k} exp(s_pi(j))], pi sorting psi descending (ties: list order).

    Plackett-Luce DPO (arXiv 2305.18290 appendix A.3), i.e. ListMLE (Xia et al., ICML 2008) on DPO's rewards.
    """
    rewards, scores = _rewards_and_scores(inputs, opts.beta)
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    ranked = rewards.gather(1, order)
    tail_logsumexp = torch.logcumsumexp(ranked.flip(1), dim=1).flip(1)
    losses = -(ranked - tail_logsumexp).sum(dim=1)
    return losses, _list_metrics(rewards, scores)
