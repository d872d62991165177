"""Process reward models: a two-class head on every token, trained on the last token of each step (Lightman et al.,
"Let's Verify Step by Step", arXiv 2305.20050; labels as Math-Shepherd, arXiv 2312.08935, and TRL's stepwise format)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def step_good_logit(step_logits: torch.Tensor) -> torch.Tensor:
    """[N, 2] head outputs (class 0 bad, class 1 good, as TRL's labels) -> [N] z = l_good - l_bad."""
    return step_logits[:, 1] - step_logits[:, 0]


def prm_loss(step_logits: torch.Tensor, step_labels: torch.Tensor) -> torch.Tensor:
    """[N] per-step losses l_i = -y_i log s(z_i) - (1 - y_i) log(1 - s(z_i)), z_i = l_good - l_bad at step i's last
    token: binary cross-entropy, which is exactly the two-class softmax cross-entropy TRL's PRMTrainer trained."""
    z = step_good_logit(_at_least_fp32(step_logits))
    return F.binary_cross_entropy_with_logits(z, step_labels.to(z.dtype), reduction="none")


def step_scores(step_logits: torch.Tensor) -> torch.Tensor:
    """[N] p(good) = softmax(l)[1] = s(l_good - l_bad) of each step."""
    return torch.sigmoid(step_good_logit(_at_least_fp32(step_logits)))


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))
