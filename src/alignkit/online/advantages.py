"""PPO's advantages, computed once per rollout (not differentiated): the KL-shaped per-token reward, reward
normalisation against running moments, GAE and whitening. Tensors are [B, k, T] with a bool mask of response tokens
(a prefix of each row: responses start at t = 0). Formulas: docs/online.md (PPO)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries, population variance (OpenRLHF), 0 outside the mask;
    shift_mean=False only scales (TRL's reward whitening)."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean).pow(2), mask)
    whitened = (values - mean) * torch.rsqrt(var.clamp(min=eps))
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def kl_shaped_rewards(scores: torch.Tensor, token_kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """r_t = -kl_coef * KL_t on every response token, plus the sequence score r(x, y) on its last token (PPO-max
    eq. 19; OpenRLHF `compute_reward`). scores [B, k]; token_kl, mask [B, k, T]."""
    rewards = -kl_coef * token_kl * mask
    last = (mask.sum(-1) - 1).clamp(min=0)  # [B, k]
    return rewards.scatter_add(-1, last[..., None], scores[..., None].to(rewards.dtype))


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al., arXiv 1506.02438):
    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}, with V = 0 after the last response token
    (OpenRLHF's convention: the last token bootstraps from 0). Returns (advantages, returns = A + V), 0 off the mask."""
    weights = mask.to(values.dtype)
    rewards, values = rewards * weights, values * weights
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[..., 0])
    T = values.shape[-1]
    for t in reversed(range(T)):
        next_value = values[..., t + 1] if t + 1 < T else torch.zeros_like(running)
        delta = rewards[..., t] + gamma * next_value - values[..., t]
        running = delta + gamma * lam * running
        advantages[..., t] = running
    advantages = advantages * weights
    return advantages, (advantages + values) * weights


@dataclass
class RunningMoments:
    """Mean and variance of every score seen so far, merged batch by batch (Chan et al.; MOSS-RLHF `RunningMoments`):
    PPO-max normalises rewards against their history, not the current batch."""

    mean: float = 0.0
    var: float = 1.0
    count: int = 0

    def update(self, values: torch.Tensor) -> None:
        values = values.detach().double().flatten()
        n = values.numel()
        if n == 0:
            return
        batch_mean, batch_var = float(values.mean()), float(values.var(unbiased=False))
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta * delta * self.count * n / total
        self.mean += delta * n / total
        self.var = m2 / total
        self.count = total

    @property
    def std(self) -> float:
        """Unbiased standard deviation of everything seen."""
        return (self.var * self.count / max(self.count - 1, 1)) ** 0.5


def normalise_scores(scores: torch.Tensor, moments: RunningMoments, mode: str, clip: float) -> torch.Tensor:
    """PPO-max eq. 18: moments absorb the batch, then r <- clip((r - mu) / sigma, -clip, clip) ("normalize") or
    r / sigma ("scale", the released MOSS-RLHF script); "none" leaves scores as they are (clip still applies)."""
    if mode != "none":
        moments.update(scores)
        std = max(moments.std, 1e-8)
        scores = (scores - moments.mean) / std if mode == "normalize" else scores / std
    return scores.clamp(-clip, clip) if clip > 0 else scores


def ppo_advantages(rewards: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, values: torch.Tensor,
                   mask: torch.Tensor, opts) -> dict[str, torch.Tensor]:
    """A rollout's advantages and returns for the ppo loss, from its rewards already normalised (normalise_scores).
    logps are the behaviour policy's (pi_old), values the value head's at rollout time; opts: PPOOptions. The KL
    term goes in the reward only when opts.kl_reward_coef > 0."""
    from alignkit.losses.online import kl_estimate

    token_kl = kl_estimate(logps, ref_logps, opts.kl_estimator) * mask
    shaped = kl_shaped_rewards(rewards, token_kl, mask, opts.kl_reward_coef)
    advantages, returns = gae(shaped, values, mask, opts.gamma, opts.lam)  # returns before any whitening
    if opts.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    if opts.advantage_clip > 0:
        advantages = advantages.clamp(-opts.advantage_clip, opts.advantage_clip) * mask
    return {"advantages": advantages, "returns": returns, "token_kl": token_kl}


def reinforce_pp_advantages(scores: torch.Tensor, mask: torch.Tensor, baseline: str = "group") -> torch.Tensor:
    """REINFORCE++(-baseline) (arXiv 2501.03262; OpenRLHF `reinforce_baseline`): r_i - mean_group(r) (or r_i),
    broadcast to every response token, then whitened over all the rollout's tokens (population variance), so the
    normalisation is global to the batch, not per prompt. scores [B, k]; mask [B, k, T]. [B, k, T], 0 off the mask."""
    centred = scores - scores.mean(1, keepdim=True) if baseline == "group" else scores
    return masked_whiten(centred[..., None].expand(mask.shape).to(torch.float32), mask)
