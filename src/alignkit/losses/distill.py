"""Distillation losses: a student trained toward a frozen teacher (docs/distillation.md).

gkd: the generalized JSD per response token over the vocabulary (or the teacher's top-k plus a tail), computed by
the loop with losses/divergence.py into LossInputs.token_divergence, token-mean over the step (GKD, arXiv
2306.13649; TRL's DistillationTrainer / GKDTrainer). opd: on-policy distillation as a per-token advantage
A_t = -c (log pi_S - log pi_T) on the student's own samples, in the GRPO family's clipped policy-gradient loss,
optionally plus a task reward's group advantage (tinker-cookbook, verl use_task_rewards)."""

from __future__ import annotations

import torch
from pydantic import Field

from alignkit.losses.base import LossInputs, LossOutput
from alignkit.losses.online import (
    Aggregation,
    GRPOOptions,
    aggregate,
    clipped_surrogate,
    group_advantages,
    group_loss,
)
from alignkit.losses.options import LossOptions


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
    losses, metrics = group_loss(per_token, inputs, ratio, opts, "opd", {})
    weights = mask.to(logps.dtype)
    teacher_gap = ((old - inputs.teacher_token_logps) * weights).sum((1, 2)) / weights.sum((1, 2)).clamp(min=1)
    metrics["distill/reverse_kl"] = teacher_gap.detach()  # mean log pi_S - log pi_T on the samples (k1 estimate)
    return losses, metrics
