"""BoNBoN alignment loss (arXiv 2406.00832): SFT on the best of n plus IPO on best vs worst, with the IPO
beta at which the trained policy matches the best-of-n distribution."""

from __future__ import annotations

from pydantic import Field

from alignkit.losses.base import LossInputs, LossOutput, logratios, pair_reward_metrics
from alignkit.losses.options import Beta, LossOptions


def bonbon_beta(n: int) -> float:
    """beta*_n = 1 / (2 (n - 1) H_{n-1}), H_k = sum_{j<=k} 1/j: for best vs worst of n, E[log pi_BoN/pi_0 of
    the best minus the worst] = (n - 1) H_{n-1}, which is IPO's target margin 1 / (2 beta). n = 8: 0.0275482."""
    if n < 2:
        raise ValueError(f"n must be >= 2, got {n}")
    harmonic = sum(1.0 / j for j in range(1, n))
    return 1.0 / (2 * (n - 1) * harmonic)


class BonBonOptions(LossOptions):
    alpha: float = Field(0.005, ge=0, le=1, description="weight of the SFT term (the official README's value)")
    beta: Beta = Field(0.0275482094, description="bonbon_beta(8): pairs are best vs worst of 8")


def bonbon_loss(inputs: LossInputs, opts: BonBonOptions) -> LossOutput:
    """l = alpha * (-l_w) + (1 - alpha) * (h - 1/(2 beta))^2, h = (l_w - l_ref,w) - (l_l - l_ref,l).

    The SFT term is the summed (not length-normalised) NLL of the best response, as in the paper. Reimplemented
    from the intended formula: the released code's `bonbon` branch calls its preference loss without ipo=True
    (a DPO log-sigmoid term logged as IPO), and its config name `combined` never matches the trainer's `bonbon`.
    """
    chosen_logratio, rejected_logratio = logratios(inputs)
    margin = chosen_logratio - rejected_logratio
    ipo = (margin - 1 / (2 * opts.beta)) ** 2
    sft = -inputs.chosen_logps
    losses = opts.alpha * sft + (1 - opts.alpha) * ipo
    metrics = pair_reward_metrics(opts.beta * chosen_logratio, opts.beta * rejected_logratio)
    return losses, {**metrics, "bonbon/sft": sft.detach(), "bonbon/ipo": ipo.detach()}
