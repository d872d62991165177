"""Distillation losses: a student trained toward a frozen teacher (docs/distillation.md).

gkd: the generalized JSD per response token over the vocabulary (or the teacher's top-k plus a tail), computed by
the loop with losses/divergence.py into LossInputs.token_divergence, token-mean over the step (GKD, arXiv
2306.13649; TRL's DistillationTrainer / GKDTrainer). opd: on-policy distillation as a per-token advantage
A_t = -c (log pi_S - log pi_T) on the student's own samples, in the GRPO family's clipped policy-gradient loss,
optionally plus a task reward's group advantage (tinker-cookbook, verl use_task_rewards). dckd and adpa: the seed
paper's distillation on preference pairs (arXiv 2502.17927)."""

from __future__ import annotations

import torch
from pydantic import Field

from alignkit.losses.base import LossInputs, LossOutput, logratios, pair_reward_metrics
from alignkit.losses.online import (
    Aggregation,
    GRPOOptions,
    aggregate,
    clipped_surrogate,
    group_advantages,
    group_loss,
)
from alignkit.losses.options import Beta, LossOptions


class GKDOptions(LossOptions):
    beta: float = Field(0.5, ge=0, le=1, description="0: forward KL(teacher || student), 1: reverse KL(student || "
                                                     "teacher), between: generalized JSD (TRL GKD's default 0.5)")
    temperature: float = Field(1.0, gt=0, description="both models' logits are divided by it")
    top_k: int = Field(0, ge=0, description="compare on the teacher's k most likely tokens only (plus a tail); "
                                            "0: the full vocabulary")
    tail: bool = Field(True, description="top_k: add the mass outside the k tokens as one more outcome (TRL's "
                                         "server teacher); false: renormalise over the k")
    loss_aggregation: Aggregation = Field("token-mean", description="token-mean over the step's tokens (TRL's "
                                                                   "num_items_in_batch reduction)")

    def needs(self) -> set[str]:
        return {"teacher"}

    def divergence(self) -> tuple[float, float]:
        """(JSD beta, temperature) of the per-token divergence the loop computes."""
        return self.beta, self.temperature


def gkd_loss(inputs: LossInputs, opts: GKDOptions) -> LossOutput:
    """l = agg_t JSD_beta(p_S(.|s_t) || p_T(.|s_t)) over the response tokens (generalized JSD at temperature tau:
    losses/divergence.generalized_jsd; the divergence arrives in inputs.token_divergence). GKD, arXiv 2306.13649."""
    if inputs.token_divergence is None or inputs.token_mask is None:
        raise ValueError("gkd needs the per-token divergence to a teacher (token_divergence); give a `teacher`")
    mask = inputs.token_mask
    divergence = inputs.token_divergence
    losses = aggregate(divergence, mask, opts.loss_aggregation, inputs.step_mean_lengths)
    weights = mask.to(divergence.dtype)
    per_example = (divergence * weights).sum((1, 2)) / weights.sum((1, 2)).clamp(min=1)
    return losses, {"distill/divergence": per_example.detach()}


def distill_advantages(student_token_logps: torch.Tensor, teacher_token_logps: torch.Tensor,
                       coef: float = 1.0) -> torch.Tensor:
    """On-policy distillation's per-token advantage A_t = -c (log pi_S(y_t) - log pi_T(y_t)) on the sampled tokens
    (no gradient: the student's log-probs are those that sampled). Its expectation under pi_S is -c KL(pi_S || pi_T)
    per token: the policy gradient then descends the reverse KL."""
    return -coef * (student_token_logps.detach() - teacher_token_logps.to(student_token_logps.device))


class OPDOptions(GRPOOptions):
    """On-policy distillation (Thinking Machines' on-policy distillation; tinker-cookbook's defaults: coefficient 1,
    no discount, an importance-sampling policy gradient): GRPO's clipped loss with the distillation advantage."""

    distill_coef: float = Field(1.0, gt=0, description="c in A_t = -c (log pi_S - log pi_T)")
    task_reward_coef: float = Field(0.0, ge=0, description="weight of the task reward's group advantage added to "
                                                           "every token's (0: distillation only)")
    kl_coef: float = Field(0.0, ge=0, description="a KL to the reference in the loss; 0: none (the teacher "
                                                  "regularises)")
    loss_aggregation: Aggregation = "token-mean"

    def needs(self) -> set[str]:
        return super().needs() | {"teacher_logps"}


def opd_loss(inputs: LossInputs, opts: OPDOptions) -> LossOutput:
    """l_t = -min(rho A_t, clip(rho, 1-e, 1+e_high) A_t) (+ kl_coef k_t, as grpo), A_t = -c (log pi_old(y_t) -
    log pi_T(y_t)) + w A_i^task, rho = pi / pi_old; token-mean by default. pi_old: the sampling student
    (old_token_logps, else the policy's own log-probs detached, every ratio 1)."""
    if inputs.teacher_token_logps is None:
        raise ValueError("opd needs the teacher's per-token log-probs of the samples (teacher_token_logps)")
    logps, mask = inputs.token_logps, inputs.token_mask
    old = inputs.old_token_logps if inputs.old_token_logps is not None else logps.detach()
    advantages = distill_advantages(old, inputs.teacher_token_logps, opts.distill_coef) * mask
    if opts.task_reward_coef > 0:
        task = group_advantages(inputs.rewards.to(logps.device), opts.scale_rewards)[..., None]
        advantages = advantages + opts.task_reward_coef * task * mask
    ratio = torch.exp(logps - old)
    eps_high = opts.epsilon_high or opts.epsilon
    per_token = clipped_surrogate(ratio, advantages, opts.epsilon, eps_high)
    losses, metrics = group_loss(per_token, inputs, (ratio, advantages), opts, "opd", {})
    weights = mask.to(logps.dtype)
    teacher_gap = ((old - inputs.teacher_token_logps) * weights).sum((1, 2)) / weights.sum((1, 2)).clamp(min=1)
    metrics["distill/reverse_kl"] = teacher_gap.detach()  # mean log pi_S - log pi_T on the samples (k1 estimate)
    return losses, metrics


def column_token_mean(per_token: torch.Tensor, mask: torch.Tensor, column: int,
                      step_mean_lengths: torch.Tensor | None) -> torch.Tensor:
    """[B] per-example sums over response `column`'s tokens divided by that column's mean token count over the step
    (default: the batch's), so the learner's mean over examples is the token-mean over the step's tokens."""
    weights = mask[:, column].to(per_token.dtype)
    mean_tokens = step_mean_lengths[column] if step_mean_lengths is not None else weights.sum(-1).mean()
    return (per_token[:, column] * weights).sum(-1) / mean_tokens.clamp(min=1)


class DCKDOptions(LossOptions):
    """DCKD (arXiv 2502.17927): forward-KL distillation from an aligned teacher on both responses of a pair."""

    chosen_kd_weight: float = Field(1.0, ge=0, description="weight of KL(teacher || student) on the chosen tokens")
    rejected_kd_weight: float = Field(1.0, ge=0, description="weight of KL(teacher || student) on the rejected "
                                                             "tokens")
    dpo_weight: float = Field(0.0, ge=0, description="a DPO term as well (the authors' trainer: dpo_weight); 0: none")
    beta: Beta = Field(0.1, description="the DPO term's beta")
    temperature: float = Field(1.0, gt=0, description="both models' logits are divided by it")
    top_k: int = Field(0, ge=0, description="the teacher's k most likely tokens only (plus a tail); 0: all")
    tail: bool = True

    def needs(self) -> set[str]:
        return {"teacher"}

    def divergence(self) -> tuple[float, float]:
        return 0.0, self.temperature  # forward KL(teacher || student)


def dckd_loss(inputs: LossInputs, opts: DCKDOptions) -> LossOutput:
    """l = w_c KL_w + w_l KL_l [+ d (-log s(b (log-ratio_w - log-ratio_l)))], KL_y the token-mean of
    KL(pi_T(.|s_t) || pi_S(.|s_t)) over response y's tokens (token_divergence at beta 0). Gao et al., arXiv 2502.17927
    (DCKD; the DPO term as in the authors' trainer)."""
    if inputs.token_divergence is None or inputs.token_mask is None:
        raise ValueError("dckd needs the per-token KL to a teacher (token_divergence); give a `teacher`")
    mask, divergence = inputs.token_mask, inputs.token_divergence
    chosen_kl = column_token_mean(divergence, mask, 0, inputs.step_mean_lengths)
    rejected_kl = column_token_mean(divergence, mask, 1, inputs.step_mean_lengths)
    losses = opts.chosen_kd_weight * chosen_kl + opts.rejected_kd_weight * rejected_kl
    metrics = {"distill/chosen_kl": chosen_kl.detach(), "distill/rejected_kl": rejected_kl.detach()}
    if opts.dpo_weight > 0:
        chosen_ratio, rejected_ratio = logratios(inputs)
        losses = losses - opts.dpo_weight * torch.nn.functional.logsigmoid(opts.beta * (chosen_ratio - rejected_ratio))
        metrics.update(pair_reward_metrics(opts.beta * chosen_ratio.detach(), opts.beta * rejected_ratio.detach()))
    return losses, metrics


class ADPAOptions(LossOptions):
    """ADPA (arXiv 2502.17927): the student's distribution on its own samples (the pairs' rejected responses) scored
    by an aligned teacher's advantage over its reference, log pi_T(a|s) - log pi_Tref(a|s), for every token a."""

    temperature: float = Field(1.0, gt=0, description="the three models' logits are divided by it")

    def needs(self) -> set[str]:
        return {"teacher", "teacher_reference"}

    def divergence(self) -> tuple[float, float]:
        return 1.0, self.temperature  # beta is unused by the advantage


def adpa_loss(inputs: LossInputs, opts: ADPAOptions) -> LossOutput:
    """l = -(1/|y_l|) sum_t sum_a pi_S(a|s_t) (log pi_T(a|s_t) - log pi_Tref(a|s_t)) over the rejected response's
    tokens (token-mean over the step; the loop puts the per-token term in token_divergence). The chosen response
    gets the loop's NLL term where sft_weight > 0 (the authors' sft_on_chosen). Gao et al., arXiv 2502.17927."""
    if inputs.token_divergence is None or inputs.token_mask is None:
        raise ValueError("adpa needs the teacher's advantage under the student (token_divergence); give a `teacher` "
                         "and a `teacher_reference`")
    losses = column_token_mean(inputs.token_divergence, inputs.token_mask, 1, inputs.step_mean_lengths)
    return losses, {"distill/advantage": -losses.detach()}
