"""Per-turn credit for multi-turn conversations (`turn_credit: per_turn`): each assistant turn t of a conversation
gets its own return G_t, the sum of the turn rewards from t on (undiscounted reward-to-go), normalised GRPO-style
against the returns of the same turn index in the record's other conversations; every token of the turn carries it.

The rollout carries what this needs on its examples (online/env_rollout.py): extras["turns"], per response the
assistant turn (0-based) of each trained token in order, and on each record's first example extras["turn_returns"],
per conversation its returns G_0, G_1, ... A conversation with fewer turns is left out of the statistics of the turn
indices it never reached; a turn index that only one conversation of the group reached gets advantage 0 (nothing to
compare it with), as a GRPO group of one would."""

from __future__ import annotations

import torch

from alignkit.data.tokenize import TokenizedExample
from alignkit.losses.online import group_advantages


def turn_returns(turn_rewards: list[float | None], reward: float) -> list[float]:
    """G_t = reward - sum_{s<t} r_s for each assistant turn t; r_s: the environment's turn rewards (None: 0).
    With environment_reward: sum the conversation's reward is the sum of its turns', so G_t = sum_{s>=t} r_s; what
    the reward adds beyond its turns' (missing_eos_penalty, a `reward` scoring a conversation the environment left
    unscored) counts at the last turn, so it is in every turn's return, and G_0 is the conversation's reward."""
    returns, earlier = [], 0.0
    for r in turn_rewards:
        returns.append(reward - earlier)
        earlier += 0.0 if r is None else float(r)
    return returns


def turn_advantages(returns: list[list[float]], scale_rewards: str = "group") -> list[list[float]]:
    """One record's k conversations, each its per-turn returns -> per-turn advantages: for turn index t,
    A_{i,t} = (G_{i,t} - mean) / (std + 1e-4) over the conversations that reached t (GRPO's group_advantages,
    Bessel-corrected std; scale_rewards none: G_{i,t} - mean only); 0 where only one conversation reached t."""
    out = [[0.0] * len(g) for g in returns]
    for t in range(max((len(g) for g in returns), default=0)):
        reached = [i for i, g in enumerate(returns) if len(g) > t]
        if len(reached) < 2:
            continue
        values = torch.tensor([[returns[i][t] for i in reached]], dtype=torch.float32)
        for i, a in zip(reached, group_advantages(values, scale_rewards)[0].tolist()):
            out[i][t] = a
    return out


def record_returns(examples: list[TokenizedExample]) -> list[list[list[float]]]:
    """[record][conversation][turn] returns of a rollout (its examples, one per record)."""
    if any("turn_returns" not in e.extras for e in examples):
        raise ValueError("turn_credit per_turn needs multi-turn rollouts (an `environment`): the rollout has no "
                         "per-turn returns")
    return [e.extras["turn_returns"] for e in examples]


def per_token(examples: list[TokenizedExample], rows: list[int], values: list[list[list[float]]]
              ) -> list[torch.Tensor]:
    """values [record][conversation][turn] -> per training example one flat tensor over its responses' trained tokens
    (the Experience's per_token form): each token its turn's value. rows: each example's record."""
    return [torch.tensor([values[row][i][turn] for i, turns in enumerate(e.extras["turns"]) for turn in turns],
                         dtype=torch.float32) for e, row in zip(examples, rows)]


def turn_credit_advantages(record_examples: list[TokenizedExample], examples: list[TokenizedExample], rows: list[int],
                           scale_rewards: str) -> list[torch.Tensor]:
    """The GRPO family's per-token advantages under per_turn (record_examples: the rollout's, one per record)."""
    return per_token(examples, rows, [turn_advantages(g, scale_rewards) for g in record_returns(record_examples)])


def turn_credit_scores(record_examples: list[TokenizedExample], examples: list[TokenizedExample], rows: list[int],
                       baseline: str) -> list[torch.Tensor]:
    """REINFORCE++'s per-token scores before its global whitening under per_turn: G_t less the mean of turn index t's
    returns in the group (baseline group), or G_t itself (baseline none)."""
    returns = record_returns(record_examples)
    values = [turn_advantages(g, "none") for g in returns] if baseline == "group" else returns
    return per_token(examples, rows, values)
