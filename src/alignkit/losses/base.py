"""What every loss receives: log-probabilities of the policy (and reference), already reduced per sequence.

Responses of an example are columns: pairs use column 0 = chosen, column 1 = rejected; lists use k columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# What every loss returns: per-example losses [B] and per-example, detached metrics {name: [B]}
LossOutput = tuple[torch.Tensor, dict[str, torch.Tensor]]


@dataclass(frozen=True)
class RunningMean:
    """The mean of every value seen so far (cumulative, not an EMA): BCO's reward shift delta.

    Losses that use it read the state before the batch (`LossInputs.loss_state`) and return the state after it in
    their metrics ("bco/reward_shift", "bco/reward_shift_count"), so the loss stays a pure function and the loop
    keeps the state (LossSpec.state: updated in training only, saved in checkpoints).
    """

    mean: float = 0.0
    count: float = 0.0

    def update(self, values: torch.Tensor) -> RunningMean:
        """State after absorbing `values` (each counts once)."""
        n = values.numel()
        if n == 0:
            return self
        total = self.count + n
        batch_mean = float(values.detach().double().mean())
        return RunningMean(self.mean + (batch_mean - self.mean) * n / total, total)

    @classmethod
    def from_metrics(cls, metrics: dict[str, torch.Tensor]) -> RunningMean | None:
        """The state a loss returned in its metrics; None when it returned none (e.g. use_reward_shift: false)."""
        if "bco/reward_shift" not in metrics:
            return None
        return cls(float(metrics["bco/reward_shift"][0]), float(metrics["bco/reward_shift_count"][0]))

    # What the loop needs to carry any loss state (LossSpec.state): save it, load it, merge ranks' updates.
    def to_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "count": self.count}

    @classmethod
    def from_dict(cls, values: dict[str, float]) -> RunningMean:
        return cls(float(values["mean"]), float(values["count"]))

    @classmethod
    def merge(cls, start: RunningMean | None, ends: list[RunningMean | None]) -> RunningMean | None:
        """One state from several processes that each began a step at `start` and absorbed their own batches:
        start plus every process's increment (so each value still counts once)."""
        start = start or cls()
        total, count = start.mean * start.count, start.count
        for end in ends:
            if end is not None:
                total += end.mean * end.count - start.mean * start.count
                count += end.count - start.count
        return cls(total / count, count) if count > 0 else None


@dataclass
class LossInputs:
    logps: torch.Tensor | None  # [B, k] summed log-probs of each response under the policy; None for reward models
    lengths: torch.Tensor  # [B, k] response token counts (float; loss-carrying tokens only)
    ref_logps: torch.Tensor | None = None  # [B, k] same under the reference model
    token_logps: torch.Tensor | None = None  # [B, k, T] per-token policy log-probs, 0 where masked
    ref_token_logps: torch.Tensor | None = None  # [B, k, T]
    token_mask: torch.Tensor | None = None  # [B, k, T] bool, True on response tokens
    labels: torch.Tensor | None = None  # [B] 1 desirable / 0 undesirable (unpaired data)
    scores: torch.Tensor | None = None  # [B, k] graded scores (listwise data)
    # KTO's reference point: summed log-probs of mismatched (prompt_i, completion_j) pairs of the same batch
    kl_logps: torch.Tensor | None = None  # [B] under the policy
    ref_kl_logps: torch.Tensor | None = None  # [B] under the reference
    # Token-level losses (SparsePO): per-position KL(pi_ref || pi_theta) over the full vocabulary, and mask values
    token_kl: torch.Tensor | None = None  # [B, k, T] >= 0, 0 where masked
    token_weights: torch.Tensor | None = None  # [B, k, T] mask m_t >= 0 on the log-ratio term
    kl_token_weights: torch.Tensor | None = None  # [B, k, T] mask on the KL term; None = same as token_weights
    # A stateful loss's state before this batch (LossSpec.state; BCO's RunningMean reward shift), kept by the loop
    loss_state: RunningMean | None = None
    # Token-mean losses: mean of `lengths` over the examples of the whole optimizer step, per column [k]; dividing
    # each example's summed loss by it makes the loop's mean over examples a token-mean over the step.
    step_mean_lengths: torch.Tensor | None = None
    # Reward models (LossSpec.output == "rewards"): the model's scalar per response instead of log-probs
    predicted_rewards: torch.Tensor | None = None  # [B, k]
    margins: torch.Tensor | None = None  # [B] per-pair margin from the data's optional "margin" field
    # MODPO: rewards of each response under the other objectives' reward models, from the data's "other_rewards"
    other_rewards: torch.Tensor | None = None  # [B, k, K]
    # Online methods (losses/online.py), filled by online/ from a rollout. The behaviour policy pi_old sampled it;
    # None: the policy itself, detached (one update per rollout: every ratio is 1).
    rewards: torch.Tensor | None = None  # [B, k] the rollout's rewards of each sample
    old_logps: torch.Tensor | None = None  # [B, k] summed log-probs under pi_old
    old_token_logps: torch.Tensor | None = None  # [B, k, T]
    advantages: torch.Tensor | None = None  # [B, k, T] per-token advantages (PPO's GAE; per-turn credit)
    returns: torch.Tensor | None = None  # [B, k, T] value targets
    values: torch.Tensor | None = None  # [B, k, T] value-head predictions (with gradient)
    old_values: torch.Tensor | None = None  # [B, k, T] the value head's predictions at rollout time
    consistency: torch.Tensor | None = None  # [B] CREAM: how far two judges agree on a pair's order, in [0, 1]
    # The rollout engine's log-probs of the sampled tokens (generate/engines), for the engine/trainer gap and TIS.
    engine_token_logps: torch.Tensor | None = None  # [B, k, T]
    # Distillation (losses/distill.py): a frozen teacher's log-probs of the sampled tokens (on-policy distillation),
    # and the per-token divergence to its distribution over the vocabulary (GKD; losses/divergence.py)
    teacher_token_logps: torch.Tensor | None = None  # [B, k, T]
    token_divergence: torch.Tensor | None = None  # [B, k, T] >= 0, 0 where masked
    # Cross-tokenizer distillation (ULD, losses/uld.py): the distance at each aligned group of tokens, and its mask
    group_divergence: torch.Tensor | None = None  # [B, k, G] >= 0, 0 where padded
    group_mask: torch.Tensor | None = None  # [B, k, G] bool

    @property
    def chosen_logps(self) -> torch.Tensor:
        return self.logps[:, 0]

    @property
    def rejected_logps(self) -> torch.Tensor:
        return self.logps[:, 1]

    @property
    def chosen_lengths(self) -> torch.Tensor:
        return self.lengths[:, 0].clamp(min=1)

    @property
    def rejected_lengths(self) -> torch.Tensor:
        return self.lengths[:, 1].clamp(min=1)

    @property
    def ref_chosen_logps(self) -> torch.Tensor:
        return self._ref()[:, 0]

    @property
    def ref_rejected_logps(self) -> torch.Tensor:
        return self._ref()[:, 1]

    def _ref(self) -> torch.Tensor:
        if self.ref_logps is None:
            raise ValueError("this loss needs reference log-probs but none were given")
        return self.ref_logps


def pair_reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-example metrics shared by pairwise losses. A tie counts as half right, so an untrained policy
    (policy == reference, every margin 0) scores 50%, which is what chance means here."""
    margins = chosen_rewards - rejected_rewards
    accuracy = (margins > 0).float() + 0.5 * (margins == 0).float()
    return {
        "rewards/chosen": chosen_rewards.detach(),
        "rewards/rejected": rejected_rewards.detach(),
        "rewards/margins": margins.detach(),
        "rewards/accuracy": accuracy.detach(),
    }


def sft_nll(chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor, token_mean: bool = False) -> torch.Tensor:
    """Per-example NLL of the chosen response (the RPO / CPO / SimPO / ORPO regulariser).

    token_mean=False: -l_w / n_w, each sequence normalised by its own length (Pang et al. 2404.19733).
    token_mean=True: -l_w * B / sum(n_w), whose batch mean is the token-mean -sum(l_w) / sum(n_w) of a
    cross-entropy over every chosen token of the batch (TRL's `sft` term, the CPO/SimPO/ORPO code).
    """
    if token_mean:
        return -chosen_logps * chosen_logps.shape[0] / chosen_lengths.sum().clamp(min=1)
    return -chosen_logps / chosen_lengths.clamp(min=1)


def needs(opts) -> frozenset[str]:
    """What the loop must compute for a loss with these options, as its options class declares in needs():
    "kl_pairs" (KTO's mismatched completions), "token_kl" / "activations" (a live reference model: SparsePO),
    "reference" (reference log-probs: online losses with a KL term), "values" (a value head: PPO)."""
    declared = getattr(opts, "needs", None)
    return frozenset(declared()) if declared is not None else frozenset()


def logratios(inputs) -> tuple:
    """(log pi/pi_ref of chosen, of rejected): the implicit rewards / beta of every pairwise loss."""
    return inputs.chosen_logps - inputs.ref_chosen_logps, inputs.rejected_logps - inputs.ref_rejected_logps
