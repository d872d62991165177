"""Reward transforms and combinations. Each wraps a Reward and is a Reward, so best-of-n and online RL take them
as they take any reward.

- LogSigmoidCentered: u = log s(r(x, y) - r_ref(x)), the LSC transform of Wang et al., "Transforming and
  Combining Rewards for Aligning Large Language Models" (arXiv 2402.00742), for Bradley–Terry rewards.
- combine_and: sum_i log s(r_i - r_i^ref) = log prod_i s(.), the log-probability that a response is good on
  every property (a logical AND), as the paper combines reward models.
- Whitened: (r - mean) / std, both estimated once on a reference set.
- LengthPenalized: r - alpha * max(0, |y| - free_length).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from alignkit.rewards.base import Reward, WeightedSum


def log_sigmoid(z: float) -> float:
    """log s(z) = -log(1 + e^-z), without overflow for large |z|."""
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def prompt_key(prompt) -> str:
    """A hashable key for a prompt: the string itself, or the JSON of a list of chat messages."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False)


@dataclass
class ReferenceRewards:
    """r_ref(x): one reference reward per prompt, looked up by prompt; `default` for prompts not in the table
    (None: an unknown prompt is an error)."""

    table: dict[str, float]
    default: float | None = None

    def __call__(self, prompts: Sequence) -> list[float]:
        values = []
        for prompt in prompts:
            key = prompt_key(prompt)
            if key in self.table:
                values.append(self.table[key])
            elif self.default is not None:
                values.append(self.default)
            else:
                raise KeyError(f"no reference reward for prompt {key[:60]!r}; add it or set a default")
        return values

    @classmethod
    def from_samples(cls, reward: Reward, prompts: Sequence, samples: Sequence[Sequence[str]], quantile: float = 0.5,
                     default: float | None = None) -> ReferenceRewards:
        """r_ref(x) = the `quantile` (linear interpolation, as numpy.quantile) of `reward` over reference-policy
        samples of x: samples[i] holds the responses sampled for prompts[i]. With one sample per prompt this is
        that sample's reward; a high quantile makes only responses better than most reference samples "good"."""
        if not 0.0 <= quantile <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {quantile}")
        table = {}
        for prompt, responses in zip(prompts, samples):
            if not responses:
                raise ValueError(f"no reference samples for prompt {prompt_key(prompt)[:60]!r}")
            scores = reward([prompt] * len(responses), list(responses))
            table[prompt_key(prompt)] = float(np.quantile(scores, quantile))
        return cls(table, default)


@dataclass
class LogSigmoidCentered(Reward):
    """u(x, y) = log s(r(x, y) - r_ref(x)), in (-inf, 0]. A response far above its reference gains little more
    (diminishing returns, less reward hacking), one far below is pushed up hard (arXiv 2402.00742).

    reference: a number, or a callable prompts -> reference rewards (e.g. ReferenceRewards)."""

    reward: Reward
    reference: float | Callable[[Sequence], Sequence[float]]
    name: str = "lsc"

    def score(self, prompts, responses):
        scores = self.reward(prompts, responses)
        refs = [float(self.reference)] * len(scores) if isinstance(self.reference, (int, float)) \
            else list(self.reference(prompts))
        return [log_sigmoid(r - r_ref) for r, r_ref in zip(scores, refs)]


def combine_and(parts: Sequence[tuple[Reward, float | Callable]], name: str = "lsc_and") -> WeightedSum:
    """sum_i log s(r_i(x, y) - r_i^ref(x)): the log-probability that (x, y) is good on every property, each
    judged by its own Bradley–Terry reward against its own reference (arXiv 2402.00742)."""
    return WeightedSum([(LogSigmoidCentered(reward, reference, name=f"lsc_{reward.name}"), 1.0)
                        for reward, reference in parts], name=name)


@dataclass
class Whitened(Reward):
    """(r - mean) / std with a fixed mean and std (use `fit` on a reference set, e.g. samples of the starting
    policy), so a response's score does not depend on the batch it is scored in."""

    reward: Reward
    mean: float
    std: float
    eps: float = 1e-8
    name: str = "whitened"

    def score(self, prompts, responses):
        return [(r - self.mean) / (self.std + self.eps) for r in self.reward(prompts, responses)]

    @classmethod
    def fit(cls, reward: Reward, prompts: Sequence, responses: Sequence[str], ddof: int = 1, **kwargs) -> Whitened:
        """Mean and standard deviation of `reward` on the reference set (ddof=1: the sample std)."""
        scores = np.asarray(reward(prompts, responses), dtype=np.float64)
        if len(scores) <= ddof:
            raise ValueError(f"whitening needs more than {ddof} reference responses, got {len(scores)}")
        return cls(reward, float(scores.mean()), float(scores.std(ddof=ddof)), **kwargs)


@dataclass
class LengthPenalized(Reward):
    """r(x, y) - alpha * max(0, |y| - free_length); |y| counts tokens of `tokenizer`, or whitespace words."""

    reward: Reward
    alpha: float
    free_length: int = 0
    tokenizer: object = field(default=None, repr=False)
    name: str = "length_penalized"

    def length(self, response: str) -> int:
        if self.tokenizer is None:
            return len(response.split())
        return len(self.tokenizer(response, add_special_tokens=False)["input_ids"])

    def score(self, prompts, responses):
        scores = self.reward(prompts, responses)
        return [r - self.alpha * max(0, self.length(y) - self.free_length) for r, y in zip(scores, responses)]
