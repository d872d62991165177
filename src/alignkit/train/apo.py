"""APO, accelerated preference optimisation (arXiv 2410.06293): iterative preference optimisation rounds with
Nesterov momentum between them.

Round t trains theta_hat_{t+1} with the usual loss (DPO, ...) against the reference pi_t, which is the model the
round starts from (the loop's reference is always its starting policy); then the next policy, which is also the
next round's reference, is extrapolated: theta_{t+1} = theta_hat_{t+1} + alpha (theta_hat_{t+1} - theta_hat_t),
with theta_hat_0 = theta_0. alpha = 0 is plain iterative DPO.

The paper extrapolates the policies themselves, log pi_{t+1} = (1 + alpha) log pi_hat_{t+1} - alpha log pi_hat_t
- log Z(x); extrapolating the weights is the cheap stand-in used here (extrapolated_weights).
extrapolated_logps gives the paper's form for reference log-probs, where Z(x) cancels in pairwise losses."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from alignkit.config import TrainConfig
from alignkit.train.ref_update import MovingReference, extrapolated_weights


def extrapolated_logps(current: torch.Tensor, previous: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1 + alpha) l_hat_{t+1} - alpha l_hat_t: the reference log-probs of the extrapolated policy, up to log Z(x)."""
    return (1 + alpha) * current - alpha * previous


@dataclass
class APORound:
    index: int  # 1-based
    output_dir: Path
    final_metrics: dict[str, float]


def apo_rounds(cfg: TrainConfig, model, tokenizer, rounds: int, alpha: float,
               round_data: Callable[[int, object], str] | None = None) -> tuple[object, list[APORound]]:
    """`rounds` rounds of cfg's method through the one loop, each in <output_dir>/round-<t>, with momentum `alpha`
    between them. round_data(t, model) -> train_data path gives round t (1-based) fresh data, e.g. pairs sampled
    from the current policy and scored (the iterative setting); by default every round reuses cfg.train_data.
    Returns the final (extrapolated) model and each round's metrics."""
    from alignkit.train import loop

    if rounds < 1:
        raise ValueError("apo_rounds needs at least one round")
    trained = MovingReference(model, every=1, keep_previous=True)  # theta_hat_0 = theta_0
    history = []
    for t in range(1, rounds + 1):
        update = {"output_dir": str(Path(cfg.output_dir) / f"round-{t}")}
        if round_data is not None:
            update["train_data"] = round_data(t, model)
        result = loop.train(cfg.model_copy(update=update), model, tokenizer)
        model = result.model
        trained.update(model)  # theta_hat_t, with theta_hat_{t-1} kept
        model.load_state_dict(trained.extrapolated(alpha))
        history.append(APORound(t, result.output_dir, result.final_metrics))
    return model, history


__all__ = ["APORound", "apo_rounds", "extrapolated_logps", "extrapolated_weights"]
