"""Pairwise losses without a reference model: ORPO, SimPO and CPO. They regularise with an NLL term or a margin
instead of a KL to a reference, so no reference log-probs are computed or cached.

Notation: l = summed response log-prob, n = response token count, a = l / n (average log-prob per token).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from alignkit.losses.base import LossInputs, LossOutput, pair_reward_metrics, sft_nll
from alignkit.losses.options import Beta, LabelSmoothing, LossOptions


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, switching form at -log 2 to avoid cancellation (Maechler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


class ORPOOptions(LossOptions):
    beta: Beta = Field(0.1, description="lambda: weight of the odds-ratio term (TRL's `beta`, the official code's `alpha`)")
    nll_token_mean: bool = Field(True, description="False: each chosen response's NLL normalised by its own length")


def orpo_loss(inputs: LossInputs, opts: ORPOOptions) -> LossOutput:
    """l = NLL(y_w) - lambda log s(log odds(a_w) - log odds(a_l)), log odds(a) = a - log(1 - e^a).

    ORPO, arXiv 2403.07691 eqs. 4 and 7. The NLL covers the response only (the official code also scores the prompt).
    """
    chosen_avg = (inputs.chosen_logps / inputs.chosen_lengths).float()
    rejected_avg = (inputs.rejected_logps / inputs.rejected_lengths).float()
    log_odds_ratio = (chosen_avg - rejected_avg) - (_log1mexp(chosen_avg) - _log1mexp(rejected_avg))
    odds_ratio_loss = -F.logsigmoid(log_odds_ratio)
    nll = sft_nll(inputs.chosen_logps, inputs.lengths[:, 0], token_mean=opts.nll_token_mean)
    losses = nll + opts.beta * odds_ratio_loss
    metrics = pair_reward_metrics(opts.beta * chosen_avg, opts.beta * rejected_avg)
    metrics["orpo/log_odds_ratio"] = log_odds_ratio.detach()
    metrics["nll"] = nll.detach()
    return losses, metrics


class SimPOOptions(LossOptions):
    beta: Beta = 2.0
    gamma_beta_ratio: float = Field(0.25, description="the target margin gamma, in units of beta (gamma = ratio * beta)")
    label_smoothing: LabelSmoothing = Field(0.0, description="cDPO-style smoothing of the sigmoid loss")
    hinge: bool = Field(False, description="max(0, 1 - b(a_w - a_l - gamma/b)) instead of the sigmoid loss")
    nll_weight: float = Field(0.0, description="the official `sft_weight`; > 0 with the defaults of CPO gives CPO-SimPO")
    nll_token_mean: bool = True


def simpo_loss(inputs: LossInputs, opts: SimPOOptions) -> LossOutput:
    """l = -log s(b (a_w - a_l) - gamma), a = average log-prob per response token. SimPO, arXiv 2405.14734."""
    chosen_avg = inputs.chosen_logps / inputs.chosen_lengths
    rejected_avg = inputs.rejected_logps / inputs.rejected_lengths
    logits = opts.beta * (chosen_avg - rejected_avg - opts.gamma_beta_ratio)
    if opts.hinge:
        losses = torch.relu(1 - logits)
    else:
        eps = opts.label_smoothing
        losses = -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
    metrics = pair_reward_metrics(opts.beta * chosen_avg, opts.beta * rejected_avg)
    if opts.nll_weight:
        nll = sft_nll(inputs.chosen_logps, inputs.lengths[:, 0], token_mean=opts.nll_token_mean)
        losses = losses + opts.nll_weight * nll
        metrics["nll"] = nll.detach()
    return losses, metrics


class CPOOptions(LossOptions):
    beta: Beta = 0.1
    label_smoothing: LabelSmoothing = 0.0
    nll_weight: float = Field(1.0, description="TRL's `cpo_alpha`: weight of the behaviour-cloning (NLL) term on the chosen response")
    nll_token_mean: bool = Field(True, description="the CPO code's token-mean cross-entropy; False: per-sequence -l_w / n_w")


def cpo_loss(inputs: LossInputs, opts: CPOOptions) -> LossOutput:
    """l = -log s(b (l_w - l_l)) + alpha NLL(y_w), summed log-probs, no reference. CPO, arXiv 2401.08417 eq. 3."""
    logits = opts.beta * (inputs.chosen_logps - inputs.rejected_logps)
    eps = opts.label_smoothing
    preference = -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
    nll = sft_nll(inputs.chosen_logps, inputs.lengths[:, 0], token_mean=opts.nll_token_mean)
    losses = preference + opts.nll_weight * nll
    metrics = pair_reward_metrics(opts.beta * inputs.chosen_logps, opts.beta * inputs.rejected_logps)
    metrics["nll"] = nll.detach()
    return losses, metrics
