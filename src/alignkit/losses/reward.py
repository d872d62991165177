"""Reward-model training: a Bradley–Terry loss on scalar rewards (LossInputs.predicted_rewards), not on log-probs.

Column 0 of `predicted_rewards` [B, 2] is the chosen response, column 1 the rejected one; the loop fills it
instead of `logps` because the registry line says output="rewards".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from alignkit.losses.base import LossInputs, LossOutput, pair_reward_metrics
from alignkit.losses.options import LossOptions


class RewardModelOptions(LossOptions):
    margin: float = Field(0.0, description="m added to every pair's margin (a record's own 'margin' field is added to it)")
    center_rewards_coefficient: float = Field(0.0, ge=0, description="eta of the reward-centering term eta (r_c + r_r)^2")



def bradley_terry_loss(inputs: LossInputs, opts: RewardModelOptions) -> LossOutput:
    """l = -log s(r_c - r_r - m) + eta (r_c + r_r)^2.

    Bradley–Terry reward modelling (Ouyang et al., arXiv 2203.02155); the margin m as in Llama 2 (arXiv 2307.09288)
    and TRL's RewardTrainer; the centering term pulls the mean reward of a pair to 0 so rewards have a fixed
    zero point (Eisenstein et al., arXiv 2312.09244). m = opts.margin + the record's "margin" (0 if absent).
    """
    if inputs.predicted_rewards is None:
        raise ValueError("the reward-model loss needs rewards per response; the loss spec must say output='rewards'")
    chosen, rejected = inputs.predicted_rewards[:, 0], inputs.predicted_rewards[:, 1]
    margin = torch.full_like(chosen, opts.margin)
    if inputs.margins is not None:
        margin = margin + inputs.margins.to(chosen)
    losses = -F.logsigmoid(chosen - rejected - margin)
    if opts.center_rewards_coefficient:
        losses = losses + opts.center_rewards_coefficient * (chosen + rejected) ** 2
    return losses, pair_reward_metrics(chosen, rejected)
