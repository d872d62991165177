"""DPO (sigmoid) with label smoothing (cDPO)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from alignkit.losses.base import LossInputs, logratios, pair_reward_metrics
from alignkit.losses.options import Beta, LabelSmoothing, LossOptions


class DPOOptions(LossOptions):
    beta: Beta = 0.1
    label_smoothing: LabelSmoothing = Field(0.0, description="cDPO's epsilon: probability that a label is flipped")


def dpo_loss(inputs: LossInputs, opts: DPOOptions) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """l = -(1-e) log s(b h) - e log s(-b h), h = (lw - lw_ref) - (ll - ll_ref).

    DPO: arXiv 2305.18290 eq. 7; cDPO (label smoothing e): Mitchell 2023, "A note on DPO with noisy preferences".
    """
    chosen_logratio, rejected_logratio = logratios(inputs)
    logits = opts.beta * (chosen_logratio - rejected_logratio)
    eps = opts.label_smoothing
    losses = -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
    metrics = pair_reward_metrics(opts.beta * chosen_logratio, opts.beta * rejected_logratio)
    return losses, metrics
