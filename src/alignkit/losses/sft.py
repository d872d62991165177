"""Supervised fine-tuning: negative log-likelihood of the response (of its assistant turns, for a chat); and its
token-wise constrained form toward the initial model (deep safety alignment)."""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import AfterValidator, Field

from alignkit.losses.base import LossInputs
from alignkit.losses.options import LossOptions


class SFTOptions(LossOptions):
    # False: each sequence's NLL is averaged over its own tokens, then over sequences (seq-mean-token-mean).
    # True: the sum over every trained token of the optimizer step / their count (TRL's SFT, the token-mean).
    token_mean: bool = False


def sft_loss(inputs: LossInputs, opts: SFTOptions) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """l = -(1/|y|) sum_t log p(y_t | x, y_<t), for the first response of each example (per-sequence mean);
    token_mean: l_b = -sum_t log p(y_t | ...) / mean_b' |y_b'|, so the loop's mean over the step's examples is
    -sum over all tokens / number of tokens. The mean length is the step's (inputs.step_mean_lengths, set by the
    loop, exact under gradient accumulation), else the batch's."""
    nll = -inputs.logps[:, 0] / inputs.lengths[:, 0].clamp(min=1)
    if not opts.token_mean:
        return nll, {"nll": nll.detach()}
    mean_length = inputs.step_mean_lengths[0] if inputs.step_mean_lengths is not None else inputs.lengths[:, 0].mean()
    return -inputs.logps[:, 0] / mean_length.clamp(min=1), {"nll": nll.detach()}


def _non_negative(betas: list[float]) -> list[float]:
    if any(b < 0 for b in betas):
        raise ValueError("each beta_t must be >= 0 (0: plain SFT at that position)")
    return betas


class ConstrainedSFTOptions(LossOptions):
    # beta_t of the first response tokens (t = 1, 2, ...) and of every later one: the paper's 0.5, then 2 for
    # t = 2..5, then 0.1. A large beta_t holds token t close to the initial model; 0 leaves it plain SFT.
    betas: Annotated[list[float], AfterValidator(_non_negative)] = Field(default_factory=lambda: [0.5, 2.0, 2.0, 2.0, 2.0])
    beta_rest: float = Field(0.1, ge=0.0, description="beta_t after the listed positions")


def position_betas(opts: ConstrainedSFTOptions, length: int, device=None) -> torch.Tensor:
    """beta_t for t = 1..length."""
    listed = torch.tensor(opts.betas[:length], dtype=torch.float64)
    rest = torch.full((max(length - len(listed), 0),), opts.beta_rest, dtype=torch.float64)
    return torch.cat([listed, rest]).to(device)


def constrained_sft_loss(inputs: LossInputs, opts: ConstrainedSFTOptions) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Deep safety alignment's token-wise constrained SFT (Qi et al., arXiv 2406.05946, Eq. 3), per sequence mean:
    l = (1/|y|) sum_t (2/beta_t) softplus(-beta_t d_t), d_t = log pi(y_t | x, y_<t) - log pi_0(y_t | x, y_<t) against
    the initial model pi_0; (2/beta) softplus(-beta d) = -(2/beta) log s(beta d). beta_t = 0 takes its beta -> 0
    limit's gradient, -log pi(y_t | ...), the SFT token loss itself (so all-zero betas are plain SFT)."""
    for name in ("token_logps", "ref_token_logps", "token_mask"):
        if getattr(inputs, name) is None:
            raise ValueError(f"sft_constrained needs per-token inputs; '{name}' is missing")
    logps, mask = inputs.token_logps[:, 0], inputs.token_mask[:, 0]
    betas = position_betas(opts, logps.shape[-1], logps.device).to(logps.dtype).expand_as(logps)
    delta = logps - inputs.ref_token_logps[:, 0].to(logps.dtype)
    safe = torch.where(betas > 0, betas, torch.ones_like(betas))
    constrained = 2.0 / safe * F.softplus(-safe * delta)
    token_losses = torch.where(betas > 0, constrained, -logps) * mask
    lengths = mask.sum(-1).clamp(min=1).to(logps.dtype)
    nll = -(logps * mask).sum(-1) / lengths
    return token_losses.sum(-1) / lengths, {"nll": nll.detach(), "token_logratio": ((delta * mask).sum(-1) / lengths).detach()}
