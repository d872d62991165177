"""Supervised fine-tuning: negative log-likelihood of the response, per token."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignkit.losses.base import LossInputs


@dataclass
class SFTOptions:
    pass


def sft_loss(inputs: LossInputs, opts: SFTOptions) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """l = -(1/|y|) sum_t log p(y_t | x, y_<t), for the first response of each example."""
    nll = -inputs.logps[:, 0] / inputs.lengths[:, 0].clamp(min=1)
    return nll, {"nll": nll.detach()}
