"""A reward named on the command line: `--reward <spec>`.

  synthetic        the quickstart task's sentiment-word share (data.synthetic.sentiment_reward)
  vader | length | format | align
                   VADER sentiment, length penalty, ends-cleanly, and the main job's sum of the three
  constraints | math | exact_match
                   verifiable rewards reading each prompt record's `constraints` / `answer` field
                   (rewards/verifiable; `constraints+bonus` adds 1 when every constraint is met)
  accuracy         math on each record's `solution` field (TRL's accuracy_reward and its datasets' column)
  module:attr      a Reward instance or class, or a callable f(prompt, response) -> float
  <directory>      a trained reward model (sequence classification, e.g. `alignkit rm`'s final/)
  prm:<directory>  a process reward model (`alignkit prm`'s final/): step scores aggregated by `aggregate`
                   (last, min or prod; default last)
"""

from __future__ import annotations

import importlib
from pathlib import Path

from alignkit.errors import ConfigError
from alignkit.rewards.base import FunctionReward, Reward

NAMED = ("synthetic", "vader", "length", "format", "align", "constraints", "constraints+bonus", "math", "exact_match",
         "accuracy")


def load_reward(spec: str, key: str = "reward", aggregate: str | None = None) -> Reward:
    """The Reward a spec names; a ConfigError naming `key` if it names none. aggregate: of a prm: spec's steps."""
    if not isinstance(spec, str) or not spec:
        raise ConfigError(key, f"expected a reward spec ({', '.join(NAMED)}, module:attr or a directory), got {spec!r}")
    if spec.startswith("prm:"):
        return process_reward(spec[4:], key, aggregate or "last")
    if aggregate is not None:
        raise ConfigError("aggregate", f"aggregates the steps of a process reward model (prm:DIR); reward '{spec}' "
                                       "has no steps, so leave it unset")
    if spec == "synthetic":
        from alignkit.data.synthetic import sentiment_reward

        return FunctionReward(lambda prompt, response: sentiment_reward(response), name="synthetic")
    if spec in ("constraints", "constraints+bonus", "math", "exact_match", "accuracy"):
        from alignkit.rewards.verifiable import ConstraintReward, ExactMatch, MathAnswer

        if spec.startswith("constraints"):
            return ConstraintReward(all_met_bonus=1.0 if spec.endswith("+bonus") else 0.0)
        if spec == "accuracy":
            return MathAnswer(field="solution", name="accuracy")
        return MathAnswer() if spec == "math" else ExactMatch()
    if spec in NAMED:
        from alignkit.rewards.text import EndsCleanly, LengthPenalty, VaderSentiment

        if spec == "align":
            return default_reward()
        return {"vader": VaderSentiment, "length": LengthPenalty, "format": EndsCleanly}[spec]()
    if Path(spec).is_dir():
        from alignkit.rewards.model import RewardModelScorer

        return RewardModelScorer(spec)
    obj = load_object(spec, key)
    if isinstance(obj, Reward):
        return obj
    if callable(obj):
        return FunctionReward(obj, name=spec)
    raise ConfigError(key, f"'{spec}' is neither a Reward nor a callable f(prompt, response)")


def process_reward(directory: str, key: str, aggregate: str) -> Reward:
    from alignkit.rewards.prm import ProcessRewardScorer, aggregate_steps

    aggregate_steps([], aggregate)  # the name checked before the model loads
    if not Path(directory).is_dir():
        raise ConfigError(key, f"prm:{directory}: no such directory (a process reward model saved by alignkit prm)")
    return ProcessRewardScorer(directory, aggregate=aggregate)


def load_object(spec: str, key: str):
    """module:attr -> the attribute; a class is instantiated with no arguments."""
    module_name, sep, attr = spec.partition(":")
    if not sep:
        raise ConfigError(key, f"'{spec}' is not a known name ({', '.join(NAMED)}), a directory, or module:attr")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(key, f"cannot import '{spec}': {err}") from None
    return obj() if isinstance(obj, type) else obj


def default_reward():
    """The main job's reward (`align`): VADER sentiment, a length penalty past 30 words, a bonus for ending cleanly."""
    from alignkit.rewards.base import WeightedSum
    from alignkit.rewards.text import EndsCleanly, LengthPenalty, VaderSentiment

    return WeightedSum([(VaderSentiment(), 1.0), (LengthPenalty(max_words=30, per_word=0.05), 1.0), (EndsCleanly(), 0.25)])
