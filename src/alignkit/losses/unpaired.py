"""Unpaired losses: each example is one completion with a label, 1 = desirable, 0 = undesirable (KTO, BCO).

logps, lengths and ref_logps are [B, 1]; labels is [B]. r = l - l_ref (summed response log-probs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from alignkit.losses.base import LossInputs, LossOutput, RunningMean
from alignkit.losses.options import Beta, LossOptions


def _labels_and_logratio(inputs: LossInputs) -> tuple[torch.Tensor, torch.Tensor]:
    if inputs.labels is None:
        raise ValueError("this loss needs labels (1 desirable / 0 undesirable) but none were given")
    desirable = inputs.labels.to(torch.bool)
    return desirable, inputs.logps[:, 0] - inputs._ref()[:, 0]


def _unpaired_metrics(desirable: torch.Tensor, rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    # Zero where the example has the other label (no NaN: the loop sums metrics). The class mean of the rewards
    # is the batch mean of "rewards/desirable" divided by the batch mean of "desirable".
    zero = torch.zeros_like(rewards)
    return {
        "rewards": rewards.detach(),
        "rewards/desirable": torch.where(desirable, rewards, zero).detach(),
        "rewards/undesirable": torch.where(desirable, zero, rewards).detach(),
        "desirable": desirable.to(rewards.dtype),
    }


class KTOOptions(LossOptions):
    beta: Beta = 0.1
    desirable_weight: float = Field(1.0, description="lambda_D")
    undesirable_weight: float = Field(1.0, description="lambda_U")
    use_kl_estimate: bool = Field(True, description="False: reference point z0 = 0 (no mismatched pairs needed)")

    def needs(self) -> set[str]:
        return {"kl_pairs"} if self.use_kl_estimate else set()


def kto_loss(inputs: LossInputs, opts: KTOOptions) -> LossOutput:
    """Desirable: lambda_D (1 - s(b (r - z0))); undesirable: lambda_U (1 - s(b (z0 - r))).

    z0 = sg(max(0, mean_j [l(y_j'|x_j) - l_ref(y_j'|x_j)])) over the batch's mismatched pairs
    (`kl_logps`, `ref_kl_logps`). KTO, arXiv 2402.01306 eq. 7.
    """
    desirable, logratio = _labels_and_logratio(inputs)
    if opts.use_kl_estimate:
        if inputs.kl_logps is None or inputs.ref_kl_logps is None:
            raise ValueError("KTO needs kl_logps and ref_kl_logps (mismatched pairs); or set use_kl_estimate: false")
        kl = (inputs.kl_logps - inputs.ref_kl_logps).detach().mean().clamp(min=0)
    else:
        kl = torch.zeros((), dtype=logratio.dtype, device=logratio.device)
    desirable_losses = opts.desirable_weight * (1 - torch.sigmoid(opts.beta * (logratio - kl)))
    undesirable_losses = opts.undesirable_weight * (1 - torch.sigmoid(opts.beta * (kl - logratio)))
    losses = torch.where(desirable, desirable_losses, undesirable_losses)
    metrics = _unpaired_metrics(desirable, opts.beta * logratio)
    metrics["kto/kl"] = kl.expand_as(logratio).detach()
    return losses, metrics


class BCOOptions(LossOptions):
    beta: Beta = 0.1


def bco_loss(inputs: LossInputs, opts: BCOOptions) -> LossOutput:
    """Desirable: -log s(r' - d); undesirable: -log s(-(r' - d)); r' = b r, d = running mean of every r' seen.

    BCO, arXiv 2404.04656. `inputs.loss_state` is the state before this batch; every reward of the batch is
    absorbed before use (as in TRL's BCOTrainer), and the state after it is returned in the metrics
    ("bco/reward_shift", "bco/reward_shift_count"). The UDM density-ratio weights are not implemented.
    """
    desirable, logratio = _labels_and_logratio(inputs)
    rewards = opts.beta * logratio
    state = (inputs.loss_state or RunningMean()).update(rewards.detach())
    shifted = rewards - state.mean
    losses = torch.where(desirable, -F.logsigmoid(shifted), -F.logsigmoid(-shifted))
    metrics = _unpaired_metrics(desirable, rewards)
    metrics["bco/reward_shift"] = torch.full_like(rewards, state.mean).detach()
    metrics["bco/reward_shift_count"] = torch.full_like(rewards, state.count).detach()
    return losses, metrics
