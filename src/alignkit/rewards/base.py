"""The Reward interface: score (prompt, response) texts. Programmatic functions, trained reward models and
combinations of them all look the same to best-of-n, decoding and online RL."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


class Reward:
    """Subclasses implement score(); calling a reward scores a batch."""

    name = "reward"

    def score(self, prompts: Sequence, responses: Sequence[str]) -> list[float]:
        raise NotImplementedError

    def __call__(self, prompts: Sequence, responses: Sequence[str]) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        return [float(x) for x in self.score(prompts, responses)]


@dataclass
class FunctionReward(Reward):
    """A Python callable f(prompt, response) -> float."""

    fn: Callable[[object, str], float]
    name: str = "function"

    def score(self, prompts, responses):
        return [self.fn(p, r) for p, r in zip(prompts, responses)]


@dataclass
class WeightedSum(Reward):
    """sum_i w_i * r_i(prompt, response)."""

    parts: list[tuple[Reward, float]]
    name: str = "sum"

    def score(self, prompts, responses):
        totals = [0.0] * len(responses)
        for reward, weight in self.parts:
            for i, value in enumerate(reward(prompts, responses)):
                totals[i] += weight * value
        return totals

    def components(self, prompts, responses) -> dict[str, list[float]]:
        return {reward.name: reward(prompts, responses) for reward, _ in self.parts}


def score_groups(reward, prompts: list, groups: list[list[str]]) -> list[list[float]]:
    """reward of every response of every prompt, in one call of the reward."""
    flat = reward([p for p, group in zip(prompts, groups) for _ in group], [r for group in groups for r in group])
    out, i = [], 0
    for group in groups:
        out.append(flat[i:i + len(group)])
        i += len(group)
    return out
