"""A process reward model as a Reward (`--reward prm:DIR`): a response is cut into steps at the model's separator,
each step scored p(good) at its last token as in training, and the step scores aggregated into one number."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from alignkit.data.stepwise import StepSettings, split_steps, tokenize_steps
from alignkit.errors import ConfigError
from alignkit.losses.prm import step_scores
from alignkit.models.inference import eval_mode
from alignkit.models.prm import labelled_logits
from alignkit.rewards.base import Reward

AGGREGATES = ("last", "min", "prod")


def aggregate_steps(scores: Sequence[float], how: str) -> float:
    """One response's score from its steps' p(good): the last step's (`last`, TRL's and search-and-learn's default),
    the weakest step's (`min`), or their product (`prod`, the probability every step is good, Lightman et al.).
    No steps: 0."""
    if how not in AGGREGATES:
        raise ConfigError("aggregate", f"expected one of {', '.join(AGGREGATES)}, got {how!r}")
    if not scores:
        return 0.0
    if how == "last":
        return float(scores[-1])
    return float(min(scores)) if how == "min" else float(math.prod(scores))


class ProcessRewardScorer(Reward):
    """Scores responses with a PRM saved by `alignkit prm` (its final/, whose prm.json names the separator)."""

    def __init__(self, model_dir: str, aggregate: str = "last", max_length: int = 1024, batch_size: int = 16):
        from alignkit.models.prm import load_prm

        model, tokenizer = load_prm(model_dir)
        meta = Path(model_dir) / "prm.json"
        separator = json.loads(meta.read_text())["step_separator"] if meta.exists() else "\n"
        self._setup(model, tokenizer, separator, aggregate, max_length, batch_size)

    @classmethod
    def from_model(cls, model, tokenizer, step_separator: str = "\n", aggregate: str = "last",
                   max_length: int = 1024, batch_size: int = 16) -> ProcessRewardScorer:
        scorer = cls.__new__(cls)
        scorer._setup(model, tokenizer, step_separator, aggregate, max_length, batch_size)
        return scorer

    def _setup(self, model, tokenizer, separator, aggregate, max_length, batch_size):
        aggregate_steps([], aggregate)  # a bad name fails here, before any scoring
        self.model, self.tokenizer, self.aggregate, self.batch_size = model, tokenizer, aggregate, batch_size
        self.settings = StepSettings(separator, max_length)
        self.name = f"prm-{aggregate}"

    @torch.no_grad()
    def step_scores(self, prompts: Sequence, responses: Sequence[str]) -> list[list[float]]:
        """p(good) of every step of every response (steps past max_length are not scored)."""
        rows = []
        for prompt, response in zip(prompts, responses):
            steps = split_steps(response, self.settings.step_separator)
            rows.append(tokenize_steps(self.tokenizer, prompt, steps, [True] * len(steps), self.settings))
        pad_id = self.tokenizer.pad_token_id or 0
        result = [[] for _ in rows]
        with eval_mode(self.model):
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start:start + self.batch_size]
                logits, _, which = labelled_logits(self.model, [r[0] for r in chunk], [r[1] for r in chunk], pad_id)
                for row, score in zip(which.tolist(), step_scores(logits).tolist()):
                    result[start + row].append(score)
        return result

    def score(self, prompts: Sequence, responses: Sequence[str]) -> list[float]:
        return [aggregate_steps(s, self.aggregate) for s in self.step_scores(prompts, responses)]
