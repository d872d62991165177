"""Losses that learn from negatives only: D2O contrasts a human-labelled harmful response with the model's own
samples, so no positive (chosen) response is needed.

Columns of logps / ref_logps [B, 1 + K]: column 0 is the negative y_l, columns 1..K are samples y_i of the
initial model. The reference is the initial model for both (pi_r+ = pi_r- in the paper's experiments).
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field

from alignkit.losses.base import LossInputs, LossOutput
from alignkit.losses.options import Beta, LossOptions


class D2OOptions(LossOptions):
    beta: Beta = Field(0.1, description="weight of the self-samples' mean log-ratio")
    alpha: float = Field(0.1, description="weight of the negative's log-ratio")


def d2o_loss(inputs: LossInputs, opts: D2OOptions) -> LossOutput:
    """l = -log s((b/K) sum_i [l(y_i) - l_ref(y_i)] - alpha [l(y_l) - l_ref(y_l)]). D2O, arXiv 2403.03419."""
    logratios = inputs.logps - inputs._ref()
    if logratios.shape[1] < 2:
        raise ValueError("d2o needs the negative (column 0) and at least one self-sample (columns 1..K)")
    sample_term = opts.beta * logratios[:, 1:].mean(dim=1)
    negative_term = opts.alpha * logratios[:, 0]
    margins = sample_term - negative_term
    losses = -F.logsigmoid(margins)
    metrics = {
        "rewards/samples": sample_term.detach(),
        "rewards/negative": negative_term.detach(),
        "rewards/margins": margins.detach(),
        "rewards/accuracy": ((margins > 0).float() + 0.5 * (margins == 0).float()).detach(),
    }
    return losses, metrics
