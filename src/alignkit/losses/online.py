"""Online RL losses: GRPO and its family (DAPO, GSPO, CISPO as option sets and one clipped-weight variant),
REINFORCE++, RLOO, PPO (clipped policy + clipped value).

Pure functions of log-probabilities like every other loss; what a rollout adds (the rewards of k samples of one
prompt in `rewards`, behaviour-policy log-probs, PPO's advantages, returns and values) arrives in LossInputs, filled by
alignkit.online. Formulas and sources: docs/online.md.

Per-token losses are aggregated to one value per example (a prompt and its k samples) such that the learner's mean
over the examples of an optimizer step is the method's aggregate:
  seq-mean-token-mean  mean over each response's tokens, then over responses (GRPO paper; TRL loss_type "grpo")
  token-mean           sum over every token of the step / their number (TRL "bnpo", "dapo"; OpenRLHF, TRL PPO)
  const-norm           sum over tokens / (responses x max_completion_length) (Dr. GRPO; TRL "dr_grpo")
"""

from __future__ import annotations

import typing
from typing import ClassVar, Literal

import torch
from pydantic import Field

from alignkit.errors import ConfigError
from alignkit.losses.base import LossInputs, LossOutput
from alignkit.losses.offpolicy import TOKEN_CORRECTIONS, OffPolicyOptions, correct_sequences, correct_tokens
from alignkit.losses.offpolicy import (
    truncated_is_weights as truncated_is_weights,  # re-exported: callers use it here
)

# The choices of the options below: the Literal types are what pydantic checks, the tuples what error messages list.
Aggregation = Literal["seq-mean-token-mean", "token-mean", "const-norm"]
KLEstimator = Literal["k1", "k2", "k3"]
ScaleRewards = Literal["group", "none"]
AGGREGATIONS = typing.get_args(Aggregation)
KL_ESTIMATORS = typing.get_args(KLEstimator)


def kl_estimate(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) on tokens sampled from pi, with d = log pi - log pi_ref:
    k1 = d, k2 = d^2 / 2, k3 = exp(-d) - 1 + d (>= 0; Schulman's estimator, as in GRPO's loss)."""
    log_ratio = logps - ref_logps
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return log_ratio.pow(2) / 2
    if estimator == "k3":
        return torch.exp(-log_ratio) - 1 + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; known: {', '.join(KL_ESTIMATORS)}")


def group_advantages(scores: torch.Tensor, scale_rewards: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """GRPO's outcome advantage of each of a prompt's k samples: A_i = (r_i - mean(r)) / (std(r) + eps), with the
    Bessel-corrected std of the group (TRL); scale_rewards "none": A_i = r_i - mean(r) (Dr. GRPO, arXiv 2503.20783).
    scores: [B, k]."""
    centred = scores - scores.mean(1, keepdim=True)
    if scale_rewards == "none":
        return centred
    return centred / (scores.std(1, keepdim=True) + eps)


def leave_one_out_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """RLOO: A_i = R_i - (1 / (k - 1)) sum_{j != i} R_j (arXiv 2402.14740). rewards: [B, k], k >= 2."""
    k = rewards.shape[1]
    if k < 2:
        raise ValueError("leave-one-out baselines need at least 2 samples per prompt")
    return rewards - (rewards.sum(1, keepdim=True) - rewards) / (k - 1)


def clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float) -> torch.Tensor:
    """PPO's clipped objective as a loss: -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) (arXiv 1707.06347)."""
    return -torch.min(ratio * advantages, ratio.clamp(1 - eps_low, 1 + eps_high) * advantages)


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       clip: float) -> torch.Tensor:
    """1/2 max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2) per token (2307.04964 sec. 3.2)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * torch.max((values - returns).pow(2), (clipped - returns).pow(2))


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: str, step_mean_lengths: torch.Tensor | None = None,
              max_completion_length: int = 0) -> torch.Tensor:
    """[B, k, T] per-token losses -> [B] per-example losses whose mean over a step's examples is `how` (see above).
    step_mean_lengths [k]: mean tokens of each response column over the step (token-mean is then exact under
    gradient accumulation); default: this batch's."""
    weights = mask.to(per_token.dtype)
    per_response = (per_token * weights).sum(-1)  # [B, k]
    if how == "seq-mean-token-mean":
        return (per_response / weights.sum(-1).clamp(min=1)).mean(1)
    if how == "token-mean":
        mean_tokens = step_mean_lengths.sum() if step_mean_lengths is not None else weights.sum((1, 2)).mean()
        return per_response.sum(1) / mean_tokens.clamp(min=1)
    if how == "const-norm":
        length = max_completion_length or per_token.shape[-1]
        return per_response.sum(1) / (per_token.shape[1] * length)
    raise ValueError(f"unknown aggregation {how!r}; known: {', '.join(AGGREGATIONS)}")


def _per_example_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, k, T] -> [B]: mean over every masked token of the example (metrics)."""
    weights = mask.to(values.dtype)
    return ((values * weights).sum((1, 2)) / weights.sum((1, 2)).clamp(min=1)).detach()


def _kl_metrics(logps: torch.Tensor, ref_logps: torch.Tensor | None, mask: torch.Tensor,
                estimators: tuple[str, ...] = ("k1",)) -> dict[str, torch.Tensor]:
    """{"kl": [B], "kl_k3": ...}: the mean over an example's responses of the summed per-token KL estimate (k1 is
    "kl"); none without reference log-probs."""
    if ref_logps is None:
        return {}
    logps = logps.detach()
    return {("kl" if e == "k1" else f"kl_{e}"): (kl_estimate(logps, ref_logps, e) * mask).sum(-1).mean(1)
            for e in estimators}


class _ReferenceIfKL(OffPolicyOptions):
    kl_coef: float = Field(0.0, ge=0, description="weight of the KL to the reference in the loss; 0: no KL term")

    def needs(self) -> set[str]:  # no KL term, no reference (TRL then loads none)
        return {"reference"} if self.kl_coef > 0 else set()


class _GroupKL(_ReferenceIfKL):
    """The KL term of the group-advantage losses: which estimator, and TRL's bias correction (docs/online.md)."""

    kl_estimator: KLEstimator = Field("k3", description="the per-token estimate of KL(pi || pi_ref) in the loss: k1 "
                                      "log-ratio, k2 its square / 2, k3 Schulman's (the GRPO paper's and TRL's)")
    kl_bias_correction: bool = Field(False, description="the estimate times rho = pi / pi_old, with gradient "
                                     "(TRL's use_bias_correction_kl, DeepSeek-V3.2's unbiased KL; TRL's default)")


class GRPOOptions(_GroupKL):
    epsilon: float = Field(0.2, description="clip range below 1")
    epsilon_high: float = Field(0.0, description="clip range above 1; 0: epsilon (DAPO's clip-higher: 0.28)")
    kl_coef: float = Field(0.04, ge=0, description="beta of the KL to the reference in the loss; 0: no KL term "
                                                   "(TRL's default)")
    scale_rewards: ScaleRewards = Field("group", description="group: divide by the group's std; none: Dr. GRPO")
    loss_aggregation: Aggregation = "seq-mean-token-mean"
    max_completion_length: int = Field(0, description="const-norm's length; 0: the longest response of the micro-batch")
    importance_sampling_level: Literal["token", "sequence"] = Field(
        "token", description="token: rho per token (GRPO); sequence: GSPO's s_i = exp(mean_t log rho_t), one ratio "
                             "and one clip per response (TRL's importance_sampling_level)")


class DAPOOptions(GRPOOptions):
    """DAPO (arXiv 2503.14476 sec. 3, 4.1): clip-higher 0.2 / 0.28, token-level loss, no KL. Its dynamic sampling
    and overlong shaping act on the rollout (online config: dynamic_sampling, overlong_cache)."""

    epsilon_high: float = 0.28
    kl_coef: float = 0.0
    loss_aggregation: Aggregation = "token-mean"


class GSPOOptions(GRPOOptions):
    """GSPO (arXiv 2507.18071): the sequence-level, length-normalised ratio clipped to [1 - 3e-4, 1 + 4e-4], no KL,
    a mean over each response then over responses (TRL's recipe: importance_sampling_level "sequence", loss "grpo")."""

    epsilon: float = 3e-4
    epsilon_high: float = 4e-4
    kl_coef: float = 0.0
    importance_sampling_level: Literal["token", "sequence"] = "sequence"


def _ratio(logps: torch.Tensor, old: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """rho_t = pi / pi_old per token; sequence: s_i = exp(sum_t m (log pi - log pi_old) / max(|o_i|, 1)), [B, k, 1]."""
    log_ratio = logps - old
    if level == "token":
        return torch.exp(log_ratio)
    weights = mask.to(logps.dtype)
    return torch.exp((log_ratio * weights).sum(-1, keepdim=True) / weights.sum(-1, keepdim=True).clamp(min=1))


def _clip_metrics(ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, low: float | None,
                  high: float) -> dict[str, torch.Tensor]:
    """TRL's clip fractions: low where rho < low and A < 0, high where rho > high and A > 0 (where the clip stops the
    gradient); low None: no lower bound."""
    ratio = ratio.detach().expand_as(mask)
    high_hit = (ratio > high) & (advantages > 0)
    low_hit = (ratio < low) & (advantages < 0) if low is not None else torch.zeros_like(high_hit)
    return {"clip_low": _per_example_mean(low_hit.float(), mask), "clip_high": _per_example_mean(high_hit.float(), mask),
            "clip_fraction": _per_example_mean((low_hit | high_hit).float(), mask)}


def _kl_term(per_token, inputs: LossInputs, logps, opts, name: str, weight: torch.Tensor | None = None):
    """per_token + kl_coef * KL estimate (opts.kl_estimator), the estimate times `weight` where given (TRL's order:
    beta * (k3 * coef_1))."""
    if opts.kl_coef <= 0:
        return per_token
    if inputs.ref_token_logps is None:
        raise ValueError(f"{name} with kl_coef > 0 needs reference per-token log-probs")
    kl = kl_estimate(logps, inputs.ref_token_logps, opts.kl_estimator)
    if weight is not None:
        kl = kl * weight
    return per_token + opts.kl_coef * kl


def _advantages(inputs: LossInputs, opts, device) -> torch.Tensor:
    """inputs.advantages [B, k, T] where the rollout gives them (turn_credit per_turn), else group advantages [B, k, 1]."""
    given = inputs.advantages
    return given if given is not None else group_advantages(inputs.rewards.to(device), opts.scale_rewards)[..., None]


def grpo_loss(inputs: LossInputs, opts: GRPOOptions) -> LossOutput:
    """l_{i,t} = -min(rho A_i, clip(rho, 1-e, 1+e_high) A_i) + kl_coef * k_t [* rho], rho = pi / pi_old per token (or
    GSPO's sequence ratio s_i), k_t the kl_estimator (k3), rho on it with kl_bias_correction, A_i = group-relative advantage of sample i among its prompt's k samples (per token where the rollout gives advantages: per-turn credit); aggregated per
    `loss_aggregation`. DeepSeekMath, arXiv 2402.03300 (objective as transcribed in TRL's docs); Dr. GRPO, arXiv
    2503.20783; DAPO, arXiv 2503.14476; GSPO, arXiv 2507.18071."""
    logps, mask = inputs.token_logps, inputs.token_mask
    old = inputs.old_token_logps if inputs.old_token_logps is not None else logps.detach()
    advantages = _advantages(inputs, opts, logps.device)
    ratio = _ratio(logps, old, mask, opts.importance_sampling_level)
    eps_high = opts.epsilon_high or opts.epsilon
    per_token = clipped_surrogate(ratio, advantages, opts.epsilon, eps_high).expand_as(logps)
    clip = _clip_metrics(ratio, advantages, mask, 1 - opts.epsilon, 1 + eps_high)
    return group_loss(per_token, inputs, (ratio, advantages), opts, "grpo", clip)


def group_loss(per_token, inputs: LossInputs, ratio_and_advantages, opts, name: str, clip: dict) -> LossOutput:
    """The shared tail of the group-advantage losses: the off-policy corrections, the KL term, the aggregation, the
    metrics (ratio: pi / pi_old with its gradient, TRL's coef_1; advantages [B, k, 1] or [B, k, T], for the
    off-policy mask; clip: the caller's clip fractions)."""
    logps, mask = inputs.token_logps, inputs.token_mask
    ratio, advantages = ratio_and_advantages
    old = inputs.old_token_logps if inputs.old_token_logps is not None else logps.detach()
    per_token, corrections = correct_tokens(per_token, inputs, old, advantages, opts, name)
    per_token = _kl_term(per_token, inputs, logps, opts, name, ratio if opts.kl_bias_correction else None)
    losses = aggregate(per_token, mask, opts.loss_aggregation, inputs.step_mean_lengths, opts.max_completion_length)
    return losses, {
        "reward": inputs.rewards.mean(1).detach(),
        **clip,
        **_kl_metrics(logps, inputs.ref_token_logps, mask, tuple(dict.fromkeys(("k1", "k3", opts.kl_estimator)))),
        **corrections,
    }


class CISPOOptions(_GroupKL):
    """CISPO (MiniMax-M1, arXiv 2506.13585 eq. 4-5): REINFORCE on every token, weighted by the detached IS weight
    clipped to [weight_min, weight_max]. TRL's loss_type "cispo" caps at epsilon_high = 5.0 with no lower bound."""

    weight_max: float = Field(5.0, description="the paper's 1 + eps_high^IS (TRL's epsilon_high, an absolute cap)")
    weight_min: float = Field(0.0, description="the paper's 1 - eps_low^IS; 0: no lower bound (the paper's choice)")
    scale_rewards: ScaleRewards = "group"
    loss_aggregation: Aggregation = "token-mean"
    max_completion_length: int = 0

    def model_post_init(self, context, /) -> None:
        super().model_post_init(context)
        if not 0 <= self.weight_min < self.weight_max:
            raise ConfigError("loss_options.weight_max", f"need 0 <= weight_min < weight_max, got {self.weight_min} "
                                                         f"and {self.weight_max}")


def cispo_loss(inputs: LossInputs, opts: CISPOOptions) -> LossOutput:
    """l_{i,t} = -sg[clip(rho_t, w_min, w_max)] A_i log pi(o_t) (+ kl_coef * k_t [* rho_t], as grpo): no token loses
    its gradient, unlike the PPO clip; aggregated per `loss_aggregation` (the paper: token-mean)."""
    logps = inputs.token_logps
    old = inputs.old_token_logps if inputs.old_token_logps is not None else logps.detach()
    advantages = _advantages(inputs, opts, logps.device)
    ratio = torch.exp(logps - old)  # with its gradient for the KL's bias correction; the weights stop it
    weights = ratio.detach().clamp(min=opts.weight_min or None, max=opts.weight_max)
    per_token = -weights * advantages * logps
    clip = _clip_metrics(ratio, advantages, inputs.token_mask, opts.weight_min or None, opts.weight_max)
    return group_loss(per_token, inputs, (ratio, advantages), opts, "cispo", clip)


class ReinforcePPOptions(_ReferenceIfKL):
    """REINFORCE++-baseline (arXiv 2501.03262; OpenRLHF's reinforce_baseline with the KL in the loss): the advantage
    r_i - mean(group) broadcast to the tokens and whitened over every token of the rollout (online/advantages.py),
    a PPO clip, and a k2 or k3 KL to the reference in the loss, token-mean."""

    epsilon: float = 0.2
    epsilon_high: float = Field(0.0, description="0: epsilon")
    kl_coef: float = Field(1e-3, ge=0)
    kl_estimator: Literal["k2", "k3"] = Field("k2", description="k2 (OpenRLHF's recommendation for the loss) or k3")
    baseline: Literal["group", "none"] = Field(
        "group", description="group: subtract the group's mean reward (-baseline); none: REINFORCE++ proper")
    loss_aggregation: Aggregation = "token-mean"


def reinforce_pp_loss(inputs: LossInputs, opts: ReinforcePPOptions) -> LossOutput:
    """l_t = -min(rho_t A_t, clip(rho_t, 1-e, 1+e_high) A_t) + kl_coef * k(log pi - log pi_ref), A_t the rollout's
    globally whitened advantage (inputs.advantages)."""
    if inputs.advantages is None:
        raise ValueError("reinforce++ needs the rollout's whitened advantages (online reinforce++ experience)")
    logps, mask = inputs.token_logps, inputs.token_mask
    old = inputs.old_token_logps if inputs.old_token_logps is not None else logps.detach()
    ratio = torch.exp(logps - old)
    eps_high = opts.epsilon_high or opts.epsilon
    per_token = clipped_surrogate(ratio, inputs.advantages, opts.epsilon, eps_high)
    per_token, corrections = correct_tokens(per_token, inputs, old, inputs.advantages, opts, "reinforce++")
    per_token = _kl_term(per_token, inputs, logps, opts, "reinforce++")
    losses = aggregate(per_token, mask, opts.loss_aggregation, inputs.step_mean_lengths)
    return losses, {
        "reward": inputs.rewards.mean(1).detach(),
        **_clip_metrics(ratio, inputs.advantages, mask, 1 - opts.epsilon, 1 + eps_high),
        **_kl_metrics(logps, inputs.ref_token_logps, mask, ("k1", opts.kl_estimator)),
        **corrections,
    }


class RLOOOptions(_ReferenceIfKL):
    kl_coef: float = Field(0.05, ge=0, description="beta: R_i = r_i - beta * (log pi_old(y_i) - log pi_ref(y_i)), "
                                                   "summed over the sequence")
    epsilon: float = Field(0.2, description="sequence-level ratio clip (inactive with one update per rollout)")
    normalize_advantages: bool = Field(False, description="divide by the micro-batch's std after centring (TRL's "
                                                          "option)")
    per_token: ClassVar[bool] = False

    def model_post_init(self, context, /) -> None:
        super().model_post_init(context)
        if self.engine_correction in TOKEN_CORRECTIONS:
            raise ConfigError("loss_options.engine_correction", f"rloo's loss is one per response: "
                              f"{self.engine_correction} weighs tokens; use sequence_truncate or sequence_mask")


def rloo_loss(inputs: LossInputs, opts: RLOOOptions) -> LossOutput:
    """REINFORCE leave-one-out: R_i = r_i - beta KL_i (sequence k1 of the behaviour policy, not differentiated),
    A_i = R_i - mean_{j != i} R_j, l_i = -min(rho_i A_i, clip(rho_i) A_i), rho_i = pi(y_i) / pi_old(y_i) over the
    whole sequence; mean over the k samples. Ahmadian et al., arXiv 2402.14740; TRL's RLOOTrainer for the ratio."""
    logps = inputs.logps
    old = inputs.old_logps if inputs.old_logps is not None else logps.detach()
    rewards = inputs.rewards.to(logps.device)
    metrics = {"reward": inputs.rewards.mean(1).detach()}
    if inputs.ref_logps is not None:
        sequence_kl = old - inputs.ref_logps
        rewards = rewards - opts.kl_coef * sequence_kl
        metrics["kl"] = sequence_kl.mean(1).detach()
    advantages = leave_one_out_advantages(rewards)
    if opts.normalize_advantages:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-4)
    ratio = torch.exp(logps - old)
    per_response = clipped_surrogate(ratio, advantages, opts.epsilon, opts.epsilon)
    per_response, corrections = correct_sequences(per_response, inputs, old, advantages, opts)
    metrics["advantage_abs"] = advantages.abs().mean(1).detach()
    return per_response.mean(1), {**metrics, **corrections}


class PPOOptions(OffPolicyOptions):
    # The loss.
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = Field(0.1, description="weight of the value loss (the value head shares the policy's backbone)")
    loss_aggregation: Aggregation = "token-mean"
    kl_coef: float = Field(0.0, ge=0, description="weight of a k3 KL-to-reference term in the loss (the alternative "
                                                  "to kl_reward_coef)")
    # The rollout's advantages (online/advantages.py reads these when it scores a rollout).
    kl_reward_coef: float = Field(0.05, description="eta: per-token reward -eta * KL_t, the score added at the last "
                                                    "token (PPO-max)")
    kl_estimator: KLEstimator = "k1"
    gamma: float = 1.0
    lam: float = 0.95
    reward_norm: Literal["normalize", "scale", "none"] = Field(
        "normalize", description="scores vs running moments: normalize (r - mu) / sigma, scale r / sigma, none")
    reward_clip: float = Field(10.0, description="|normalised score| <= this; 0: no clipping")
    whiten_advantages: bool = Field(True, description="over the whole rollout (TRL, OpenRLHF); PPO-max whitens per "
                                                      "minibatch")
    advantage_clip: float = Field(0.0, description="|A| <= this after whitening (MOSS-RLHF code: 0.5); 0: none")

    renamed: ClassVar[dict[str, str]] = {"kl_loss_coef": "kl_coef"}

    def needs(self) -> set[str]:  # the KL-shaped reward reads the reference; GAE the value head
        return {"reference", "values"}

    @classmethod
    def refuse_ambiguous(cls, values: dict) -> None:
        """kl_coef was PPO's reward shaping before it became the loss term every method has: a config naming
        kl_coef without kl_reward_coef may be either, so it is refused rather than read one way."""
        if "kl_coef" in values and "kl_reward_coef" not in values:
            raise ConfigError("loss_options.kl_coef", "ppo's kl_coef is now the KL term in the loss (was kl_loss_coef);"
                              " the KL in the reward is kl_reward_coef (was kl_coef): set kl_reward_coef too, or "
                              "rename kl_coef to kl_reward_coef (docs/glossary.md)")


def ppo_loss(inputs: LossInputs, opts: PPOOptions) -> LossOutput:
    """l_t = max(-A_t rho_t, -A_t clip(rho_t, 1-e, 1+e)) + c_v * 1/2 max((V_t - R_t)^2, (V_old,t + clip(V_t - V_old,t,
    -e_v, e_v) - R_t)^2) [+ kl_coef * k3_t], with A_t, R_t from GAE on the KL-shaped reward (online/advantages.py).
    Schulman et al. arXiv 1707.06347; Zheng et al. ("Secrets of RLHF" I, PPO-max) arXiv 2307.04964 eq. 8-17."""
    if inputs.values is None or inputs.advantages is None or inputs.returns is None:
        raise ValueError("ppo needs values (a value head), advantages and returns")
    logps, mask = inputs.token_logps, inputs.token_mask
    old = inputs.old_token_logps if inputs.old_token_logps is not None else logps.detach()
    old_values = inputs.old_values if inputs.old_values is not None else inputs.values.detach()
    ratio = torch.exp(logps - old)
    policy_loss = clipped_surrogate(ratio, inputs.advantages, opts.cliprange, opts.cliprange)
    policy_loss, corrections = correct_tokens(policy_loss, inputs, old, inputs.advantages, opts, "ppo")
    value_loss = clipped_value_loss(inputs.values, old_values, inputs.returns, opts.cliprange_value)
    per_token = policy_loss + opts.vf_coef * value_loss
    if opts.kl_coef > 0:
        per_token = per_token + opts.kl_coef * kl_estimate(logps, inputs.ref_token_logps, "k3")
    losses = aggregate(per_token, mask, opts.loss_aggregation, inputs.step_mean_lengths)
    clipped = ((ratio < 1 - opts.cliprange) | (ratio > 1 + opts.cliprange)).float()
    return losses, {
        "policy_loss": _per_example_mean(policy_loss, mask),
        "value_loss": _per_example_mean(value_loss, mask),
        "clip_fraction": _per_example_mean(clipped, mask),
        **_kl_metrics(logps, inputs.ref_token_logps, mask),
        **corrections,
    }
