"""Pairwise losses that keep DPO's data (prompt, chosen, rejected) but change its link, target or margin.

Notation: r = l - l_ref (summed response log-probs), h = r_w - r_l, n = response token count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from alignkit.errors import ConfigError
from alignkit.losses.base import LossInputs, LossOutput, RunningMean, logratios, pair_reward_metrics, sft_nll
from alignkit.losses.options import Beta, LabelSmoothing, LossOptions


class RobustDPOOptions(LossOptions):
    beta: Beta = 0.1
    label_smoothing: LabelSmoothing = Field(0.1, description="probability that a preference label was flipped")


def robust_dpo_loss(inputs: LossInputs, opts: RobustDPOOptions) -> LossOutput:
    """l = [(1-e)(-log s(b h)) - e(-log s(-b h))] / (1 - 2e); unbiased under label flips with probability e.

    rDPO, arXiv 2403.00409. A single example's loss can be negative.
    """
    chosen_logratio, rejected_logratio = logratios(inputs)
    logits = opts.beta * (chosen_logratio - rejected_logratio)
    eps = opts.label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)
    return losses, pair_reward_metrics(opts.beta * chosen_logratio, opts.beta * rejected_logratio)


class IPOOptions(LossOptions):
    beta: Beta = Field(0.1, description="IPO's tau: the target margin is 1 / (2 tau)")
    length_normalize: bool = Field(False, description="True: per-token average log-ratios (TRL's form)")


def ipo_loss(inputs: LossInputs, opts: IPOOptions) -> LossOutput:
    """l = (h - 1/(2 tau))^2 with h from summed log-probs; length_normalize uses r_w/n_w - r_l/n_l (TRL).

    IPO, arXiv 2310.12036 eq. 17.
    """
    chosen_logratio, rejected_logratio = logratios(inputs)
    if opts.length_normalize:
        margin = chosen_logratio / inputs.chosen_lengths - rejected_logratio / inputs.rejected_lengths
    else:
        margin = chosen_logratio - rejected_logratio
    losses = (margin - 1 / (2 * opts.beta)) ** 2
    return losses, pair_reward_metrics(opts.beta * chosen_logratio, opts.beta * rejected_logratio)


class HingeOptions(LossOptions):
    beta: Beta = Field(0.1, description="the margin is 1/beta nats of log-ratio")


def hinge_loss(inputs: LossInputs, opts: HingeOptions) -> LossOutput:
    """l = max(0, 1 - b h): RSO's hinge-norm loss (TRL `hinge`). RSO, arXiv 2309.06657."""
    chosen_logratio, rejected_logratio = logratios(inputs)
    losses = torch.relu(1 - opts.beta * (chosen_logratio - rejected_logratio))
    return losses, pair_reward_metrics(opts.beta * chosen_logratio, opts.beta * rejected_logratio)


class SLiCOptions(LossOptions):
    margin: float = Field(1.0, description="delta: the calibration margin in nats of summed log-prob")
    nll_weight: float = Field(0.1, description="lambda on the chosen response's summed NLL")


def slic_loss(inputs: LossInputs, opts: SLiCOptions) -> LossOutput:
    """l = max(0, delta - l_w + l_l) - lambda l_w. No reference model. SLiC-HF, arXiv 2305.10425."""
    calibration = torch.relu(opts.margin - inputs.chosen_logps + inputs.rejected_logps)
    losses = calibration - opts.nll_weight * inputs.chosen_logps
    metrics = pair_reward_metrics(inputs.chosen_logps, inputs.rejected_logps)
    metrics["slic/calibration"] = calibration.detach()
    return losses, metrics


class NCAOptions(LossOptions):
    beta: Beta = 0.1


def nca_pair_loss(inputs: LossInputs, opts: NCAOptions) -> LossOutput:
    """l = -log s(b r_w) - 1/2 log s(-b r_w) - 1/2 log s(-b r_l). NCA, arXiv 2402.05369."""
    chosen_logratio, rejected_logratio = logratios(inputs)
    chosen_rewards, rejected_rewards = opts.beta * chosen_logratio, opts.beta * rejected_logratio
    losses = (
        -F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards) - 0.5 * F.logsigmoid(-rejected_rewards)
    )
    return losses, pair_reward_metrics(chosen_rewards, rejected_rewards)


class EXOOptions(LossOptions):
    beta: Beta = 0.1
    label_smoothing: LabelSmoothing = Field(1e-3, description="the target puts 1-e on chosen and e on rejected; must be > 0")

    def model_post_init(self, context, /) -> None:
        if not self.label_smoothing > 0:
            raise ConfigError("loss_options.label_smoothing", "EXO needs label_smoothing > 0 (e.g. 1e-3)")


def exo_pair_loss(inputs: LossInputs, opts: EXOOptions) -> LossOutput:
    """l = KL(q || p), q = softmax(b r_w, b r_l) = (s(b h), s(-b h)), p = (1-e, e). EXO, arXiv 2402.00856 eq. 16."""
    chosen_logratio, rejected_logratio = logratios(inputs)
    logits = opts.beta * (chosen_logratio - rejected_logratio)
    eps = torch.tensor(opts.label_smoothing, dtype=logits.dtype, device=logits.device)
    log_q_chosen, log_q_rejected = F.logsigmoid(logits), F.logsigmoid(-logits)
    losses = log_q_chosen.exp() * (log_q_chosen - torch.log1p(-eps)) + log_q_rejected.exp() * (
        log_q_rejected - torch.log(eps)
    )
    return losses, pair_reward_metrics(opts.beta * chosen_logratio, opts.beta * rejected_logratio)


class DPOPOptions(LossOptions):
    beta: Beta = 0.1
    dpop_lambda: float = Field(50.0, description="weight of the penalty for pushing the chosen log-prob below the reference")


def dpop_loss(inputs: LossInputs, opts: DPOPOptions) -> LossOutput:
    """l = -log s(b [h - lambda max(0, -r_w)]). DPO-Positive (Smaug), arXiv 2402.13228 eq. 3."""
    chosen_logratio, rejected_logratio = logratios(inputs)
    penalty = torch.relu(-chosen_logratio)
    losses = -F.logsigmoid(opts.beta * (chosen_logratio - rejected_logratio - opts.dpop_lambda * penalty))
    metrics = pair_reward_metrics(opts.beta * chosen_logratio, opts.beta * rejected_logratio)
    metrics["dpop/penalty"] = penalty.detach()
    return losses, metrics


class RDPOOptions(LossOptions):
    beta: Beta = 0.1
    alpha: float = Field(0.01, description="reward per response token subtracted by the length regulariser")


def rdpo_loss(inputs: LossInputs, opts: RDPOOptions) -> LossOutput:
    """l = -log s(b h + alpha (n_w - n_l)): DPO for the reward r - alpha |y|. R-DPO, arXiv 2403.19159."""
    chosen_logratio, rejected_logratio = logratios(inputs)
    length_gap = inputs.lengths[:, 0] - inputs.lengths[:, 1]
    losses = -F.logsigmoid(opts.beta * (chosen_logratio - rejected_logratio) + opts.alpha * length_gap)
    return losses, pair_reward_metrics(opts.beta * chosen_logratio, opts.beta * rejected_logratio)


class BCOPairOptions(LossOptions):
    beta: Beta = 0.1
    use_reward_shift: bool = Field(True, description="False: TRL >= 0.29 `bco_pair`, which has no shift (delta = 0)")


def bco_pair_loss(inputs: LossInputs, opts: BCOPairOptions) -> LossOutput:
    """l = -log s(b r_w - d) - log s(-(b r_l - d)); d = running mean of per-batch mean rewards (detached).

    BCO, arXiv 2404.04656 (pairwise form from the authors' TRL PR 5999b1b). The state in
    `inputs.loss_state` is the one before this batch; the batch is absorbed (one value per batch) before
    use, and the state after it is returned in the metrics.
    """
    chosen_logratio, rejected_logratio = logratios(inputs)
    chosen_rewards, rejected_rewards = opts.beta * chosen_logratio, opts.beta * rejected_logratio
    metrics = pair_reward_metrics(chosen_rewards, rejected_rewards)
    if opts.use_reward_shift:
        batch_mean = torch.cat([chosen_rewards, rejected_rewards]).detach().mean().reshape(1)
        state = (inputs.loss_state or RunningMean()).update(batch_mean)
        delta = state.mean
        metrics["bco/reward_shift"] = torch.full_like(chosen_rewards, delta).detach()
        metrics["bco/reward_shift_count"] = torch.full_like(chosen_rewards, state.count).detach()
    else:
        delta = 0.0
    losses = -F.logsigmoid(chosen_rewards - delta) - F.logsigmoid(-(rejected_rewards - delta))
    return losses, metrics


class RPOOptions(LossOptions):
    beta: Beta = 0.1
    nll_weight: float = Field(1.0, description="alpha on the chosen response's NLL")
    nll_token_mean: bool = Field(False, description="True: token-mean NLL over the batch (TRL's loss_type=['sigmoid', 'sft'])")


def rpo_loss(inputs: LossInputs, opts: RPOOptions) -> LossOutput:
    """l = -log s(b h) - alpha l_w / n_w: DPO plus the chosen response's NLL. Iterative RPO, arXiv 2404.19733."""
    chosen_logratio, rejected_logratio = logratios(inputs)
    nll = sft_nll(inputs.chosen_logps, inputs.lengths[:, 0], token_mean=opts.nll_token_mean)
    losses = -F.logsigmoid(opts.beta * (chosen_logratio - rejected_logratio)) + opts.nll_weight * nll
    metrics = pair_reward_metrics(opts.beta * chosen_logratio, opts.beta * rejected_logratio)
    metrics["nll"] = nll.detach()
    return losses, metrics


class CREAMOptions(LossOptions):
    beta: Beta = 0.1


def cream_loss(inputs: LossInputs, opts: CREAMOptions) -> LossOutput:
    """l = -C log s(b h) - (1 - C) log s(-b h), h = (lw - lw_ref) - (ll - ll_ref), C = inputs.consistency in [0, 1]
    (1 where absent: DPO): DPO whose label is trusted as far as two consecutive iterations' rankings agree.
    CREAM, Wang et al. arXiv 2410.12735 (official code: sft_dpo_trainer.py, `dpo_consistency_dynamic`)."""
    chosen_logratio, rejected_logratio = logratios(inputs)
    logits = opts.beta * (chosen_logratio - rejected_logratio)
    consistency = inputs.consistency if inputs.consistency is not None else torch.ones_like(logits)
    consistency = consistency.to(logits.device, logits.dtype)
    losses = -consistency * F.logsigmoid(logits) - (1 - consistency) * F.logsigmoid(-logits)
    metrics = pair_reward_metrics(opts.beta * chosen_logratio, opts.beta * rejected_logratio)
    metrics["consistency"] = consistency.detach()
    return losses, metrics
