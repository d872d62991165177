"""Supervised fine-tuning: negative log-likelihood of the response (of its assistant turns, for a chat)."""

from __future__ import annotations

import torch

from alignkit.losses.base import LossInputs
from alignkit.losses.options import LossOptions


class SFTOptions(LossOptions):
    # False: each sequence's NLL is averaged over its own tokens, then over sequences (seq-mean-token-mean).
    # True: the sum over every trained token of the optimizer step / their count (TRL's SFT, the token-mean).
    token_mean: bool = False


def sft_loss(inputs: LossInputs, opts: SFTOptions) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """l = -(1/|y|) sum_t log p(y_t | x, y_<t), for the first response of each example (per-sequence mean);
    token_mean: l_b = -sum_t log p(y_t | ...) / mean_b' |y_b'|, so the loop's mean over the step's examples is
    -sum over all tokens / number of tokens. The mean length is the step's (inputs.step_mean_lengths, set by the
    loop, exact under gradient accumulation), else the batch's."""
    nll = -inputs.logps[:, 0] / inputs.lengths[:, 0].clamp(min=1)
    if not opts.token_mean:
        return nll, {"nll": nll.detach()}
    mean_length = inputs.step_mean_lengths[0] if inputs.step_mean_lengths is not None else inputs.lengths[:, 0].mean()
    return -inputs.logps[:, 0] / mean_length.clamp(min=1), {"nll": nll.detach()}
