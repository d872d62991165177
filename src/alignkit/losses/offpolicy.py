"""Off-policy corrections shared by the online losses (GRPO family, REINFORCE++, PPO per token; RLOO per sequence):
importance weights pi_old / pi_engine against the rollout engine (TRL 1.16's four vllm_importance_sampling_modes,
IcePop, and AReaL's decoupled PPO for async rollouts), DeepSeek-V3.2's off-policy sequence mask, and the per-round metrics of the sampler-trainer mismatch.
Formulas, sources and defaults: docs/online.md ("Off-policy corrections")."""

from __future__ import annotations

import logging
import typing
from typing import Literal

import torch
from pydantic import Field, PrivateAttr

from alignkit.errors import ConfigError
from alignkit.losses.options import LossOptions

log = logging.getLogger("alignkit.config")

Correction = Literal["auto", "none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask", "icepop",
                     "decoupled"]
CORRECTIONS = typing.get_args(Correction)
TOKEN_CORRECTIONS = ("token_truncate", "token_mask", "icepop", "decoupled")
# TRL 1.16 GRPOConfig: vllm_importance_sampling_mode "sequence_mask", clip_max 3.0, clip_min None (what auto turns on
# for an engine whose log-probs are not the trainer's). IcePop (Ring-1T, arXiv 2510.18855): [alpha, beta] = [0.5, 5].
INEXACT_ENGINE_DEFAULT = "sequence_mask"
TRL_RATIO_MAX = 3.0
ICEPOP_BOUNDS = (0.5, 5.0)
# What auto turns on for async rollouts (online `async: {max_staleness: N}`, N > 0): the engine's log-probs are then a
# stale policy's, exact engine or not. Token-level losses: AReaL's decoupled PPO (arXiv 2505.24298 sec. 5.1); a loss
# per response (rloo): the sequence ratio, truncated at TRL's cap.
STALE_TOKEN_DEFAULT, STALE_SEQUENCE_DEFAULT = "decoupled", "sequence_truncate"


class OffPolicyOptions(LossOptions):
    """The correction options every online loss takes (one set for all of them)."""

    engine_correction: Correction = Field(
        "auto", description="importance weights pi_old / pi_engine against the rollout engine: token_truncate, "
        "token_mask, sequence_truncate, sequence_mask (TRL's vllm_importance_sampling_mode), icepop (token_mask in "
        "[0.5, 5]), decoupled (AReaL's decoupled PPO: the clip against pi_old, the learner's weights before the "
        "update, times pi_old / pi_engine; no bounds unless given), none; auto: sequence_mask (TRL's default) where "
        "the engine's log-probs are not the trainer's (bf16 weights, vllm), none on the exact fp32 engines, "
        "decoupled (rloo: sequence_truncate) for async rollouts")
    engine_ratio_min: float | None = Field(None, ge=0, description="lower bound of the engine ratio (truncate: "
                                           "clipped up to it; mask: below it carries no loss); none: the mode's "
                                           "(no bound; icepop 0.5)")
    engine_ratio_max: float | None = Field(None, gt=0, description="upper bound of the engine ratio; none: the "
                                           "mode's (3, TRL's vllm_importance_sampling_clip_max; icepop 5)")
    off_policy_mask_threshold: float | None = Field(
        None, ge=0, description="delta of DeepSeek-V3.2's off-policy sequence mask: a negative-advantage response "
        "whose mean per-token log(pi_engine / pi) exceeds it carries no loss (TRL's off_policy_mask_threshold); "
        "none: off")
    tis_cap: float | None = Field(None, ge=0, description="the earlier name: tis_cap C is engine_correction "
                                  "token_truncate with engine_ratio_max C; 0: none")
    _named_by_tis_cap: bool = PrivateAttr(False)  # errors then name the key the config gave
    per_token: typing.ClassVar[bool] = True  # a loss per token (False: one per response, rloo)

    def model_post_init(self, context, /) -> None:
        if self.tis_cap is not None:
            self._from_tis_cap()
        low, high = ratio_bounds(self)
        if low is not None and high is not None and low >= high:
            raise ConfigError("loss_options.engine_ratio_min", f"must be below engine_ratio_max (got {low} and "
                                                               f"{high}); IcePop's [alpha, beta] is [0.5, 5]")
        if self.engine_correction == "none" and (self.engine_ratio_min, self.engine_ratio_max) != (None, None):
            raise ConfigError("loss_options.engine_correction", "is none, so engine_ratio_min / engine_ratio_max "
                                                                "would do nothing; pick a mode or drop the bounds")

    def _from_tis_cap(self) -> None:
        """tis_cap C > 0 -> token_truncate below C; 0 -> none (what it meant); the new keys may not be given too."""
        if self.engine_correction != "auto" or self.engine_ratio_max is not None:
            raise ConfigError("loss_options.tis_cap", "is the earlier name of engine_correction: token_truncate with "
                                                      "engine_ratio_max; give one or the other")
        log.info("loss_options.tis_cap is now loss_options.engine_correction token_truncate with engine_ratio_max "
                 "(the old name still works)")
        cap, self.tis_cap = self.tis_cap, None
        self.engine_correction = "token_truncate" if cap > 0 else "none"
        self.engine_ratio_max = cap if cap > 0 else None
        self._named_by_tis_cap = True


def ratio_bounds(opts) -> tuple[float | None, float | None]:
    """(low, high) of the engine ratio for opts.engine_correction: the given bounds, else the mode's defaults
    (decoupled: none; AReaL's behav_imp_weight_cap is engine_ratio_max, above which a token carries no loss)."""
    defaults = {"icepop": ICEPOP_BOUNDS, "decoupled": (None, None)}
    low, high = defaults.get(opts.engine_correction, (None, TRL_RATIO_MAX))
    return (low if opts.engine_ratio_min is None else opts.engine_ratio_min,
            high if opts.engine_ratio_max is None else opts.engine_ratio_max)


def resolve_correction(opts, engine_exact: bool, stale: bool = False):
    """The options with `auto` made concrete for a run's engine: none where its log-probs are the trainer's (fp32
    hf / fast), TRL's default sequence_mask elsewhere (bf16 weights, vllm); stale (async rollouts): decoupled PPO
    (rloo: sequence_truncate), whatever the engine. Other modes stay as given."""
    if getattr(opts, "engine_correction", None) != "auto":
        return opts
    if stale:
        mode = STALE_TOKEN_DEFAULT if opts.per_token else STALE_SEQUENCE_DEFAULT
    else:
        mode = "none" if engine_exact else INEXACT_ENGINE_DEFAULT
    return opts.model_copy(update={"engine_correction": mode})


def engine_ratio(old_logps: torch.Tensor, engine_logps: torch.Tensor, mask: torch.Tensor,
                 sequence: bool) -> torch.Tensor:
    """TRL's ratio: exp(m (log pi_old - log pi_engine)) per token [B, k, T], or exp of its sum over the response
    [B, k, 1] (sequence: the product of the token ratios); a NaN engine log-prob (unscored) counts as ratio 1."""
    diff = torch.where(mask, old_logps.detach() - engine_logps.to(old_logps.device), torch.zeros_like(old_logps))
    diff = torch.nan_to_num(diff, nan=0.0)
    return torch.exp(diff.sum(-1, keepdim=True) if sequence else diff)


def truncated_is_weights(trainer_logps: torch.Tensor, engine_logps: torch.Tensor, mask: torch.Tensor,
                         cap: float) -> torch.Tensor:
    """TIS (Yao et al.; TRL token_truncate): w_t = min(exp(log pi_trainer - log pi_engine), cap) on the sampled tokens,
    1 off the mask; a constant (no gradient), multiplying the surrogate before any KL term is added."""
    return engine_weights(engine_ratio(trainer_logps, engine_logps, mask, False), "token_truncate", None, cap)[0]


def engine_weights(ratio: torch.Tensor, mode: str, low: float | None,
                   high: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, outside): *_truncate clamps the ratio to [low, high]; *_mask and icepop zero it outside [low, high]
    (a None bound is no bound). outside: where the ratio left the bounds (clipped or masked)."""
    outside = torch.zeros_like(ratio, dtype=torch.bool)
    if low is not None:
        outside |= ratio < low
    if high is not None:
        outside |= ratio > high
    if mode.endswith("truncate"):
        return ratio.clamp(min=low, max=high), outside
    return ratio.masked_fill(outside, 0.0), outside


def off_policy_keep(advantages: torch.Tensor, mean_log_ratio: torch.Tensor, threshold: float) -> torch.Tensor:
    """DeepSeek-V3.2 (arXiv 2512.02556) eq. 9: M = 0 where A < 0 and (1/|o|) sum_t log(pi_old / pi_theta) > delta,
    else 1; pi_old is the sampling policy (the engine's log-probs where given, TRL's get_off_policy_mask)."""
    return ((advantages >= 0) | (mean_log_ratio <= threshold)).to(mean_log_ratio.dtype)


def _token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, k, T] -> [B]: mean over every masked token of the example (detached, a metric)."""
    weights = mask.to(values.dtype)
    return ((values.detach() * weights).sum((1, 2)) / weights.sum((1, 2)).clamp(min=1))


def mismatch_metrics(old_logps: torch.Tensor, engine_logps: torch.Tensor, mask: torch.Tensor) -> dict:
    """The sampler-trainer mismatch per example, over its scored tokens: mismatch_kl, the k1 estimate of
    KL(pi_engine || pi_old) (mean log pi_engine - log pi_old), and mismatch_kl_k3 (mean r - 1 - log r, r = pi_old /
    pi_engine, >= 0)."""
    engine = engine_logps.to(old_logps.device)
    scored = mask & ~torch.isnan(engine)
    log_r = torch.where(scored, old_logps.detach() - torch.nan_to_num(engine), torch.zeros_like(old_logps))
    return {"mismatch_kl": _token_mean(-log_r, scored), "mismatch_kl_k3": _token_mean(torch.expm1(log_r) - log_r, scored)}


def correct_tokens(per_token: torch.Tensor, inputs, old: torch.Tensor, advantages: torch.Tensor, opts,
                   name: str) -> tuple[torch.Tensor, dict]:
    """per_token [B, k, T] policy losses times the off-policy sequence mask and the engine weights (TRL's order, before
    the KL term is added), with the mismatch metrics and the share of tokens each dropped or clipped.
    advantages: [B, k, 1] or [B, k, T]; old: pi_old's token log-probs (the policy's, detached, with one update)."""
    mask, engine = inputs.token_mask, inputs.engine_token_logps
    metrics = mismatch_metrics(old, engine, mask) if engine is not None else {}
    if opts.off_policy_mask_threshold is not None:
        behaviour = engine.to(old.device) if engine is not None else old
        log_ratio = torch.nan_to_num(behaviour - inputs.token_logps.detach(), nan=0.0) * mask
        mean = log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
        keep = off_policy_keep(advantages, mean, opts.off_policy_mask_threshold)
        per_token = per_token * keep
        metrics["off_policy_masked"] = _token_mean((keep == 0).expand_as(mask).to(old.dtype), mask)
    mode = opts.engine_correction
    if mode in ("auto", "none"):
        return per_token, metrics
    if engine is None:
        key = "tis_cap" if getattr(opts, "_named_by_tis_cap", False) else f"engine_correction {mode}"
        raise ValueError(f"{name} with {key} needs the rollout engine's per-token log-probs")
    ratio = engine_ratio(old, engine, mask, sequence=mode.startswith("sequence"))
    weights, outside = engine_weights(ratio, mode, *ratio_bounds(opts))
    share = _token_mean(outside.expand_as(mask).to(old.dtype), mask)
    metrics["engine_ratio_clipped" if mode.endswith("truncate") else "engine_ratio_masked"] = share
    return per_token * weights, metrics


def correct_sequences(per_response: torch.Tensor, inputs, old_seq: torch.Tensor, advantages: torch.Tensor,
                      opts) -> tuple[torch.Tensor, dict]:
    """The same for a loss per response ([B, k]: RLOO): the sequence modes and the off-policy mask on summed
    log-probs (engine tokens NaN -> 0, as TRL), the k1 mismatch per token of each example."""
    engine = inputs.engine_token_logps
    engine_seq = torch.nan_to_num(engine, nan=0.0).sum(-1).to(old_seq.device) if engine is not None else None
    lengths = inputs.lengths.to(old_seq.device)
    metrics = {}
    if engine_seq is not None:
        metrics["mismatch_kl"] = ((engine_seq - old_seq.detach()).sum(1) / lengths.sum(1).clamp(min=1)).detach()
    if opts.off_policy_mask_threshold is not None:
        behaviour = engine_seq if engine_seq is not None else old_seq
        mean = (behaviour - inputs.logps.detach()) / lengths.clamp(min=1)
        keep = off_policy_keep(advantages, mean, opts.off_policy_mask_threshold)
        per_response = per_response * keep
        metrics["off_policy_masked"] = ((1 - keep) * lengths).sum(1) / lengths.sum(1).clamp(min=1)
    mode = opts.engine_correction
    if mode in ("auto", "none"):
        return per_response, metrics
    if engine_seq is None:
        raise ValueError(f"rloo with engine_correction {mode} needs the rollout engine's per-token log-probs")
    weights, outside = engine_weights(torch.exp(old_seq.detach() - engine_seq), mode, *ratio_bounds(opts))
    share = (outside * lengths).sum(1) / lengths.sum(1).clamp(min=1)
    metrics["engine_ratio_clipped" if mode.endswith("truncate") else "engine_ratio_masked"] = share.detach()
    return per_response * weights, metrics
