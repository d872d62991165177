"""The main job's recipe (recipes/align.py): pair building, before/after metrics, and the whole run end to end
on a tiny local model (the real SmolLM2 run is the README's `make align`, minutes long, not a test)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from alignkit.data.load import write_jsonl_atomic
from alignkit.data.synthetic import VOCABULARY, prompt_records
from alignkit.eval.metrics import bootstrap_mean_ci, distinct_n, win_rate
from alignkit.models.tiny import build_tiny_model, build_word_tokenizer
from alignkit.recipes.align import build_pairs, evaluate_before_after, run_align
from alignkit.rewards.base import FunctionReward
from alignkit.rewards.text import EndsCleanly, LengthPenalty, VaderSentiment

LENGTH_REWARD = FunctionReward(lambda prompt, response: float(len(response.split())), name="words")


def test_build_pairs_takes_best_and_worst_and_drops_small_gaps():
    prompts = ["p1", "p2"]
    samples = [["a b", "a b c d", "a"], ["x y", "x z", "x w"]]  # p2: all equal length -> gap 0 -> dropped
    pairs, scores = build_pairs(prompts, samples, LENGTH_REWARD, min_gap=0.5)
    assert scores == [2.0, 4.0, 1.0, 2.0, 2.0, 2.0]
    assert pairs == [{"prompt": "p1", "chosen": "a b c d", "rejected": "a", "chosen_reward": 4.0,
                      "rejected_reward": 1.0}]


def test_before_after_metrics_match_numpy():
    prompts = ["p"] * 4
    before, after = ["a", "a b", "a b c", "b"], ["a b", "a b", "a b c d e", "b c"]
    s = evaluate_before_after(prompts, before, after, LENGTH_REWARD)
    gains = np.array([1, 0, 2, 1], dtype=float)
    assert s["reward_gain"] == pytest.approx(gains.mean())
    assert s["win_rate"] == pytest.approx((1 + 0.5 + 1 + 1) / 4)
    low, high = s["reward_gain_ci95"]
    assert low <= gains.mean() <= high
    assert s["words_after"] == pytest.approx(np.mean([2, 2, 5, 2]))


def test_metric_helpers():
    assert win_rate([1, 2, 3], [0, 2, 4]) == pytest.approx((1 + 0.5 + 0) / 3)
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)  # (a,b) (b,a) (a,b)
    mean, low, high = bootstrap_mean_ci([1.0] * 10)
    assert mean == low == high == 1.0


def test_bootstrap_interval_equals_a_percentile_bootstrap_and_the_normal_approximation():
    values = np.random.default_rng(5).normal(0.3, 1.0, size=200)
    mean, low, high = bootstrap_mean_ci(values, n_resamples=4000, seed=11)
    # the percentile bootstrap written out resample by resample, with the same generator and seed
    rng = np.random.default_rng(11)
    means = sorted(float(np.mean(values[rng.integers(0, len(values), size=len(values))])) for _ in range(4000))
    assert mean == pytest.approx(values.mean())
    assert low == pytest.approx(np.percentile(means, 2.5)) and high == pytest.approx(np.percentile(means, 97.5))
    # and its width is the normal approximation's, 2 x 1.96 s / sqrt(n), within 10 %
    width = 2 * 1.96 * values.std(ddof=1) / np.sqrt(len(values))
    assert high - low == pytest.approx(width, rel=0.1) and low < mean < high


def test_default_reward_parts():
    assert VaderSentiment()(["p", "p"], ["I love this, it is wonderful.", "I hate this, it is awful."])[0] > 0.5
    assert LengthPenalty(max_words=3, per_word=0.5)(["p", "p"], ["a b c", "a b c d e"]) == [0.0, -1.0]
    assert EndsCleanly()(["p", "p"], ["Done.", "cut off"]) == [1.0, 0.0]


def test_run_align_end_to_end_on_a_tiny_model(tmp_path):
    tokenizer = build_word_tokenizer(VOCABULARY)
    model = build_tiny_model("llama", len(tokenizer), hidden=32, layers=1)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl_atomic(prompts, prompt_records(12, seed=0))
    summary = run_align(overrides={"model": str(tmp_path / "model"), "prompts": str(prompts), "output_dir": str(tmp_path / "run"),
                                   "train_prompts": 6, "eval_prompts": 4, "samples_per_prompt": 2, "max_new_tokens": 5,
                                   "epochs": 1, "min_reward_gap": 0.0, "precision": "fp32"})
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["win_rate"] == pytest.approx(summary["win_rate"])
    assert len(saved["rewards_before"]) == 4
    html = (tmp_path / "run" / "report.html").read_text()
    assert f"{summary['reward_before']:+.3f}" in html
    assert (tmp_path / "run" / "rewards.png").stat().st_size > 0
    # DPO really ran on the job's own pairs: best over worst, its reference the starting model (first loss log 2),
    # and it changed the weights the aligned answers came from
    from safetensors.torch import load_file

    from alignkit.train.logging import read_metrics

    pairs = [json.loads(line) for line in (tmp_path / "run" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == saved["pairs"] > 0 and all(p["chosen_reward"] > p["rejected_reward"] for p in pairs)
    steps = read_metrics(tmp_path / "run" / "dpo")
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-5) and sum(r["examples"] for r in steps) == len(pairs)
    before, after = (load_file(path / "model.safetensors") for path in (tmp_path / "model", tmp_path / "run" / "dpo" /
                                                                        "final"))
    assert any(not torch.equal(before[k], after[k]) for k in before)
