"""Rewards computed from text alone: sentiment (VADER, a lexicon nobody here wrote), length, format."""

from __future__ import annotations

from dataclasses import dataclass

from alignkit.rewards.base import Reward


@dataclass
class VaderSentiment(Reward):
    """VADER's compound sentiment score in [-1, 1] (Hutto & Gilbert, ICWSM 2014)."""

    name: str = "sentiment"

    def __post_init__(self):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def score(self, prompts, responses):
        return [self._analyzer.polarity_scores(r)["compound"] for r in responses]


@dataclass
class LengthPenalty(Reward):
    """0 up to max_words, then -per_word for every word beyond, and -empty_penalty for an empty answer:
    keeps a sentiment reward from being won by rambling or by saying nothing."""

    max_words: int = 30
    per_word: float = 0.05
    empty_penalty: float = 1.0
    name: str = "length"

    def score(self, prompts, responses):
        out = []
        for r in responses:
            n = len(r.split())
            out.append(-self.empty_penalty if n == 0 else -self.per_word * max(0, n - self.max_words))
        return out


@dataclass
class EndsCleanly(Reward):
    """1 if the answer ends a sentence (., !, ?), else 0: rewards finished answers over cut-off ones."""

    name: str = "format"

    def score(self, prompts, responses):
        return [1.0 if r.rstrip().endswith((".", "!", "?", '"')) else 0.0 for r in responses]
