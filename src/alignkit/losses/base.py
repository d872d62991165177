"""What every loss receives: log-probabilities of the policy (and reference), already reduced per sequence.

Responses of an example are columns: pairs use column 0 = chosen, column 1 = rejected; lists use k columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LossInputs:
    logps: torch.Tensor  # [B, k] summed log-probs of each response under the policy
    lengths: torch.Tensor  # [B, k] response token counts (float)
    ref_logps: torch.Tensor | None = None  # [B, k] same under the reference model
    token_logps: torch.Tensor | None = None  # [B, k, T] per-token policy log-probs, 0 where masked
    ref_token_logps: torch.Tensor | None = None  # [B, k, T]
    token_mask: torch.Tensor | None = None  # [B, k, T] bool, True on response tokens
    labels: torch.Tensor | None = None  # [B] 1 desirable / 0 undesirable (unpaired data)
    scores: torch.Tensor | None = None  # [B, k] graded scores (listwise data)

    @property
    def chosen_logps(self) -> torch.Tensor:
        return self.logps[:, 0]

    @property
    def rejected_logps(self) -> torch.Tensor:
        return self.logps[:, 1]

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
