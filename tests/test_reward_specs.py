"""Reward specs (rewards/spec.py): every named spec gives its documented values (not only that it loads),
module:attr specs load functions and classes, and bad specs are named errors."""

from __future__ import annotations

import pytest

from alignkit.errors import ConfigError
from alignkit.rewards.spec import load_reward


def shout(prompt, response) -> float:  # a module:attr reward for the spec test
    return float(response.isupper())


def test_named_reward_specs_give_their_documented_values():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    texts = ["I love this, it is wonderful!", "This is terrible and awful", "", " ".join(["word"] * 35) + "."]
    prompts = ["p"] * len(texts)
    analyzer = SentimentIntensityAnalyzer()
    vader = load_reward("vader")(prompts, texts)
    assert vader == [analyzer.polarity_scores(t)["compound"] for t in texts] and vader[0] > 0 > vader[1]
    length = load_reward("length")(prompts, texts)
    assert length == pytest.approx([0.0, 0.0, -1.0, -0.05 * 5])  # 30 words free, 0.05 a word past them, -1 if empty
    fmt = load_reward("format")(prompts, texts)
    assert fmt == [1.0, 0.0, 0.0, 1.0]
    combined = load_reward("align")(prompts, texts)
    assert combined == pytest.approx([v + n + 0.25 * f for v, n, f in zip(vader, length, fmt)])


def test_module_attr_specs_and_bad_specs():
    assert load_reward("test_reward_specs:shout")(["p", "p"], ["LOUD", "quiet"]) == [1.0, 0.0]
    ends = load_reward("alignkit.rewards.text:EndsCleanly")  # a class: instantiated with no arguments
    assert ends(["p"], ["Done."]) == [1.0]
    with pytest.raises(ConfigError, match="reward") as err:
        load_reward("no_such_reward")
    assert err.value.key == "reward"
    with pytest.raises(ConfigError, match="cannot import"):
        load_reward("no_such_module_x:f")
    with pytest.raises(ConfigError, match="neither a Reward nor a callable"):
        load_reward("alignkit.rewards.spec:NAMED")
