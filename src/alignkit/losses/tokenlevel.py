"""Token-level preference losses: per-token log-ratios and KL terms weighted by a token mask (SparsePO).

Needs per-token tensors [B, 2, T] (column 0 chosen, 1 rejected): token_logps, ref_token_logps, token_mask,
token_weights (the mask m_t) and token_kl (KL(pi_ref || pi_theta) at each position, over the full vocabulary).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from alignkit.losses.base import LossInputs, LossOutput, pair_reward_metrics
from alignkit.losses.options import Beta, LossOptions


def activation_token_weights(activations: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """SparsePO's activation-based mask (the code's `mapo`, activation_mapping="zn_rescale"), detached.

    activations: [B, k, T, H], one value per position for each of H hooked modules of the *reference* model
    (each module's output averaged over its hidden dimension). Per sequence and module, values are rescaled to
    [0, 1] over the response tokens (z-normalising first, as the code does, changes nothing after min-max), then
    averaged over modules. A sequence whose values are all equal gets weight 1 on every token (plain token DPO).
    """
    mask = token_mask.unsqueeze(-1).to(torch.bool)
    values = activations.detach().to(torch.float32)
    inf = torch.tensor(float("inf"), device=values.device)
    low = torch.where(mask, values, inf).amin(dim=2, keepdim=True)
    high = torch.where(mask, values, -inf).amax(dim=2, keepdim=True)
    spread = high - low
    rescaled = torch.where(spread > 0, (values - low) / spread.clamp(min=torch.finfo(values.dtype).tiny), 1.0)
    return (rescaled * mask).mean(dim=-1)


class SparsePOOptions(LossOptions):
    beta: Beta = 0.1
    use_token_kl: bool = Field(True, description="False: drop the KL term (a masked token-level DPO)")
    l1_weight: float = Field(0.0, description="lambda_u on ||m_w||_1 + ||m_l||_1 of the log-ratio mask")
    kl_l1_weight: float = Field(0.0, description="lambda_d on the KL mask's L1 norms")
    # How the loop makes the mask m: "activations" (the reference's activations, activation_token_weights; the
    # code's mapo) or "uniform" (1 on every token: token-level DPO with the KL term)
    token_weights: Literal["activations", "uniform"] = "activations"

    def needs(self) -> set[str]:
        return {name for name, on in (("token_kl", self.use_token_kl),
                                      ("activations", self.token_weights == "activations")) if on}



def sparsepo_loss(inputs: LossInputs, opts: SparsePOOptions) -> LossOutput:
    """l = -log s(b (u - d)) + L1 terms; u = sum_t m_w d_w - sum_t m_l d_l (d_t = token log-ratio),
    d = sum_t m'_l KL_l - sum_t m'_w KL_w. SparsePO, arXiv 2410.05102."""
    for name in ("token_logps", "ref_token_logps", "token_mask", "token_weights"):
        if getattr(inputs, name) is None:
            raise ValueError(f"sparsepo needs per-token inputs; '{name}' is missing")
    mask = inputs.token_mask.to(inputs.token_logps.dtype)
    reward_weights = inputs.token_weights * mask
    token_logratios = (inputs.token_logps - inputs.ref_token_logps) * mask
    weighted_logratios = (reward_weights * token_logratios).sum(dim=-1)  # [B, 2]
    u = weighted_logratios[:, 0] - weighted_logratios[:, 1]
    penalty = opts.l1_weight * reward_weights.abs().sum(dim=(1, 2))
    if opts.use_token_kl:
        if inputs.token_kl is None:
            raise ValueError("sparsepo needs token_kl (per-token KL to the reference); or set use_token_kl: false")
        kl_weights = reward_weights if inputs.kl_token_weights is None else inputs.kl_token_weights * mask
        weighted_kl = (kl_weights * inputs.token_kl * mask).sum(dim=-1)  # [B, 2]
        d = weighted_kl[:, 1] - weighted_kl[:, 0]
        penalty = penalty + opts.kl_l1_weight * kl_weights.abs().sum(dim=(1, 2))
    else:
        weighted_kl = torch.zeros_like(weighted_logratios)
        d = torch.zeros_like(u)
    losses = -F.logsigmoid(opts.beta * (u - d)) + penalty
    # as in the SparsePO code, the logged reward of a response is b (masked log-ratio - masked KL)
    rewards = opts.beta * (weighted_logratios - weighted_kl)
    metrics = pair_reward_metrics(rewards[:, 0], rewards[:, 1])
    metrics["sparsepo/mask_mean"] = (reward_weights.sum(dim=(1, 2)) / mask.sum(dim=(1, 2)).clamp(min=1)).detach()
    return losses, metrics
