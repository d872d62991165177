"""Multi-objective preference losses: MODPO trains one objective's preferences while the other objectives enter as
a margin from their (frozen, precomputed) reward models, so one run gives the policy for one weighting.

Data: pairs with `other_rewards` {"chosen": [r_1..r_K], "rejected": [r_1..r_K]} (LossInputs.other_rewards [B, 2, K]),
or with `margin` = sum_k w_k (r_k(x, y_w) - r_k(x, y_l)) already weighted (LossInputs.margins [B]).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from alignkit.losses.base import LossInputs, LossOutput, logratios, pair_reward_metrics
from alignkit.losses.options import Beta, LossOptions


class MODPOOptions(LossOptions):
    beta: Beta = 0.1
    weight: float = Field(0.5, gt=0, description="w0: the weight of the objective these preferences express (it divides the margin)")
    other_weights: tuple[float, ...] = Field((), description="w_1..w_K of the other objectives; () = (1 - w0) / K each (sum to 1)")
    hinge: bool = Field(False, description="True: relu(1 - z) instead of -log s(z)")

    @field_validator("other_weights", mode="before")
    @classmethod
    def _numbers(cls, value):  # YAML gives a list; each weight a finite number, not a bool or text
        if not isinstance(value, (list, tuple)) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
            raise ValueError(f"must be a list of finite numbers, got {value!r}")
        return tuple(float(v) for v in value)


def margin_from_other_rewards(inputs: LossInputs, opts: MODPOOptions) -> torch.Tensor:
    """[B] sum_k w_k (r_k(x, y_w) - r_k(x, y_l)), from `other_rewards` or, failing that, the data's `margin`."""
    if inputs.other_rewards is not None:
        gaps = inputs.other_rewards[:, 0, :] - inputs.other_rewards[:, 1, :]  # [B, K]
        count = gaps.shape[-1]
        weights = opts.other_weights or ((1 - opts.weight) / count,) * count
        if len(weights) != count:
            raise ValueError(f"modpo: the data gives {count} other reward(s) per response but other_weights has "
                             f"{len(weights)}")
        return (gaps * torch.tensor(weights, dtype=gaps.dtype, device=gaps.device)).sum(-1)
    if inputs.margins is not None:
        return inputs.margins
    raise ValueError("modpo needs the other objectives' rewards: give each pair 'other_rewards' "
                     "({\"chosen\": [...], \"rejected\": [...]}) or a weighted 'margin'")


def modpo_loss(inputs: LossInputs, opts: MODPOOptions) -> LossOutput:
    """l = -log s(z), z = (1/w0) [b h - sum_k w_k (r_k(x, y_w) - r_k(x, y_l))]; hinge: relu(1 - z).

    MODPO, arXiv 2310.03708 (official modpo_trainer.py::modpo_loss). With no other objective (margin 0, w0 = 1) it
    is DPO.
    """
    chosen_logratio, rejected_logratio = logratios(inputs)
    margin = margin_from_other_rewards(inputs, opts).to(chosen_logratio.dtype)
    z = (opts.beta * (chosen_logratio - rejected_logratio) - margin) / opts.weight
    losses = torch.relu(1 - z) if opts.hinge else -F.logsigmoid(z)
    metrics = pair_reward_metrics(opts.beta * chosen_logratio, opts.beta * rejected_logratio)
    metrics["modpo/margin"] = margin.detach()
    return losses, metrics
