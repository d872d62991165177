"""Reward transforms (arXiv 2402.00742 and friends): every value against a NumPy computation by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from alignkit.models.tiny import build_word_tokenizer
from alignkit.rewards.base import FunctionReward
from alignkit.rewards.transforms import (
    LengthPenalized,
    LogSigmoidCentered,
    ReferenceRewards,
    Whitened,
    combine_and,
    log_sigmoid,
    prompt_key,
)

PROMPTS = ["p1", "p2", [{"role": "user", "content": "p3"}]]
RESPONSES = ["a b c", "a", "a b c d e f"]
# reward = number of words * scale + per-prompt offset, so every value is easy to write by hand
OFFSET = {"p1": 0.0, "p2": -1.0, prompt_key(PROMPTS[2]): 2.0}


def words(scale: float = 1.0, name: str = "words"):
    return FunctionReward(lambda p, r: scale * len(r.split()) + OFFSET[prompt_key(p)], name=name)


def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -np.asarray(x, dtype=np.float64))


def test_log_sigmoid_is_exact_and_stable():
    for z in (-800.0, -30.0, -1.0, 0.0, 0.3, 25.0, 800.0):
        assert log_sigmoid(z) == pytest.approx(float(np_log_sigmoid(z)), rel=1e-12, abs=1e-300)
    assert log_sigmoid(0.0) == pytest.approx(-math.log(2.0))
    assert log_sigmoid(-800.0) == -800.0 and log_sigmoid(800.0) == 0.0  # no overflow at either end


def test_lsc_against_a_constant_and_a_per_prompt_reference():
    raw = np.array([3.0, 0.0, 8.0])
    constant = LogSigmoidCentered(words(), 2.5)(PROMPTS, RESPONSES)
    np.testing.assert_allclose(constant, np_log_sigmoid(raw - 2.5), rtol=1e-12)
    reference = ReferenceRewards({"p1": 1.0, "p2": 4.0, prompt_key(PROMPTS[2]): 8.0})
    per_prompt = LogSigmoidCentered(words(), reference)(PROMPTS, RESPONSES)
    np.testing.assert_allclose(per_prompt, np_log_sigmoid(raw - np.array([1.0, 4.0, 8.0])), rtol=1e-12)
    assert all(u <= 0 for u in per_prompt) and per_prompt[2] == pytest.approx(-math.log(2))  # r == r_ref: log 1/2


def test_lsc_has_diminishing_returns_above_the_reference():
    lsc = LogSigmoidCentered(FunctionReward(lambda p, r: float(r)), 0.0)
    u = lsc(["x"] * 4, ["-4", "-2", "2", "4"])
    # raising a poor response by 2 gains much more than raising a good one by 2
    assert (u[1] - u[0]) > 10 * (u[3] - u[2]) > 0


def test_reference_rewards_from_samples_are_numpy_quantiles():
    samples = [["a", "a b", "a b c d"], ["a b c"], ["a", "a b c d e", "a b", "a b c"]]
    for q in (0.0, 0.5, 0.85, 1.0):
        reference = ReferenceRewards.from_samples(words(), PROMPTS, samples, quantile=q)
        expected = [np.quantile([len(s.split()) + OFFSET[prompt_key(p)] for s in group], q)
                    for p, group in zip(PROMPTS, samples)]
        np.testing.assert_allclose(reference(PROMPTS), expected, rtol=1e-12)
    assert ReferenceRewards.from_samples(words(), PROMPTS[:1], [["a b"]], quantile=0.9)(["p1"]) == [2.0]
    with pytest.raises(KeyError, match="no reference reward"):
        reference(["unseen"])
    assert ReferenceRewards({"p1": 1.0}, default=-3.0)(["p1", "unseen"]) == [1.0, -3.0]
    with pytest.raises(ValueError, match="quantile"):
        ReferenceRewards.from_samples(words(), PROMPTS, samples, quantile=1.5)


def test_combining_by_sum_is_the_log_probability_that_every_property_is_good():
    helpful, brief = words(1.0, "helpful"), FunctionReward(lambda p, r: -0.5 * len(r.split()), name="brief")
    combined = combine_and([(helpful, 2.0), (brief, -1.5)])
    values = combined(PROMPTS, RESPONSES)
    r_helpful = np.array([3.0, 0.0, 8.0])
    r_brief = np.array([-1.5, -0.5, -3.0])
    expected = np_log_sigmoid(r_helpful - 2.0) + np_log_sigmoid(r_brief + 1.5)
    np.testing.assert_allclose(values, expected, rtol=1e-12)
    # exp(sum) = product of the per-property probabilities of "good"
    sigmoid = 1 / (1 + np.exp(-(r_helpful - 2.0))) * 1 / (1 + np.exp(-(r_brief + 1.5)))
    np.testing.assert_allclose(np.exp(values), sigmoid, rtol=1e-12)
    assert set(combined.components(PROMPTS, RESPONSES)) == {"lsc_helpful", "lsc_brief"}


def test_whitening_uses_the_reference_sets_mean_and_sample_std():
    reference_responses = ["a", "a b", "a b c", "a b c d e f g"]
    reference_prompts = ["p1"] * 4
    whitened = Whitened.fit(words(), reference_prompts, reference_responses)
    raw = np.array([1.0, 2.0, 3.0, 7.0])
    assert whitened.mean == pytest.approx(raw.mean()) and whitened.std == pytest.approx(raw.std(ddof=1))
    np.testing.assert_allclose(whitened(reference_prompts, reference_responses),
                               (raw - raw.mean()) / (raw.std(ddof=1) + 1e-8), rtol=1e-12)
    # later scores use the fixed statistics, whatever else is in the batch
    assert whitened(["p2"], ["a b c"]) == pytest.approx([(2.0 - raw.mean()) / raw.std(ddof=1)])
    population = Whitened.fit(words(), reference_prompts, reference_responses, ddof=0)
    assert population.std == pytest.approx(raw.std())
    with pytest.raises(ValueError, match="more than 1"):
        Whitened.fit(words(), ["p1"], ["a"])


def test_length_penalty_in_words_and_in_tokens():
    penalized = LengthPenalized(words(), alpha=0.25, free_length=2)
    np.testing.assert_allclose(penalized(PROMPTS, RESPONSES), [3.0 - 0.25, 0.0, 8.0 - 0.25 * 4], rtol=1e-12)
    tokenizer = build_word_tokenizer(["a", "b", "c", "d", "e", "f"])
    in_tokens = LengthPenalized(FunctionReward(lambda p, r: 0.0), alpha=0.5, tokenizer=tokenizer)
    assert in_tokens(["x", "x"], ["a b <eos>", "a b c"]) == [-1.5, -1.5]  # <eos> is one token
