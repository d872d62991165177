"""The training-free baseline row of `alignkit eval --urial true` (eval/urial_row.py; URIAL, arXiv 2312.01552): its
answers are exactly `alignkit generate --preset urial`'s on the same model, prompts, sampling and seed; its reward,
A's paired gain over it, the win rates and its lengths follow from those answers by hand; the report has the row;
the option without a model to prompt is refused before any model loads."""

from __future__ import annotations

import json

import numpy as np
import pytest

from alignkit.errors import AlignkitError, ConfigError
from alignkit.eval.evaluate import EvalExtras, evaluate_responses, run_eval
from alignkit.eval.metrics import length_stats
from alignkit.models.tiny import build_tiny_model, build_word_tokenizer
from alignkit.recipes.decoding import run_generate

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = [f"w{i}" for i in range(30)]


def word_value(prompt, response) -> float:
    """A reward that differs from answer to answer: the words' numbers mod 7, summed, over 10."""
    return sum(int(w[1:]) % 7 for w in response.split() if w[1:].isdigit()) / 10


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("urial")
    tokenizer = build_word_tokenizer(WORDS)
    for name, seed in (("aligned", 4), ("base", 5)):
        build_tiny_model("llama", len(tokenizer), seed=seed, hidden=32, layers=2).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"w{i} w{i + 2}"}) + "\n" for i in range(1, 9)))
    common = {"prompts": str(prompts), "max_new_tokens": 10, "temperature": 1.0, "seed": 7,
              "reward": "test_eval_urial:word_value"}
    return root, tokenizer, common


def urial_generate(root, model: str, common: dict, out: str) -> list[str]:
    path = run_generate(overrides={"model": str(root / model), "prompts": common["prompts"], "preset": "urial",
                                   "output_dir": str(root / out), "max_new_tokens": common["max_new_tokens"],
                                   "temperature": common["temperature"], "seed": common["seed"]})
    return [json.loads(line)["completion"] for line in path.read_text().splitlines()]


def test_urial_row_is_generate_preset_urial_and_its_numbers_follow(setup):
    root, tokenizer, common = setup
    out = root / "eval"
    result = run_eval(overrides={**common, "model": str(root / "aligned"), "baseline": str(root / "base"),
                                 "urial": True, "output_dir": str(out)})
    summary = result["summary"]
    rows = [json.loads(line) for line in (out / "urial_samples.jsonl").read_text().splitlines()]
    responses_urial = [r["completion"] for r in rows]
    expected = urial_generate(root, "base", common, "generated")
    assert responses_urial == expected and len(set(expected)) > 1
    prompts = [json.loads(line)["prompt"] for line in open(common["prompts"])]
    assert [r["prompt"] for r in rows] == prompts
    # the URIAL row is not the plain baseline: the preset changed what B answers
    rewards_urial = np.array([word_value(p, r) for p, r in zip(prompts, responses_urial)])
    rewards_a = np.array(summary["rewards_a"])
    assert summary["rewards_urial"] == pytest.approx(rewards_urial.tolist())
    assert not np.allclose(rewards_a, rewards_urial) and summary["rewards_b"] != summary["rewards_urial"]
    row = summary["urial"]
    assert row["model"] == str(root / "base")
    assert row["mean_urial"] == pytest.approx(rewards_urial.mean())
    assert row["mean_a"] == pytest.approx(rewards_a.mean())
    assert row["gain"] == pytest.approx((rewards_a - rewards_urial).mean())
    assert row["gain_ci_low"] <= row["gain"] <= row["gain_ci_high"] and row["gain_ci_low"] < row["gain_ci_high"]
    assert row["win_rate"] == pytest.approx(((rewards_a > rewards_urial) + 0.5 * (rewards_a == rewards_urial)).mean())
    # the reward judge has no position bias: both orders agree with the reward win rate
    judge = summary["judge_urial"]
    assert judge["win_rate_calibrated"] == pytest.approx(row["win_rate"]) and judge["consistency_rate"] == 1.0
    assert summary["length_urial"] == length_stats(responses_urial, tokenizer)
    assert summary["length_urial"]["words_mean"] == pytest.approx(np.mean([len(r.split()) for r in responses_urial]))
    saved = json.loads((out / "eval.json").read_text())
    assert saved["urial"] == row and saved["rewards_urial"] == summary["rewards_urial"]
    report = (out / "report.html").read_text()
    label = f"{root / 'base'} + URIAL (training-free)"
    gain_cell = f"{row['gain']:+.4f} [{row['gain_ci_low']:+.4f}, {row['gain_ci_high']:+.4f}]"
    assert "A against each baseline" in report and f"<td>{label}</td><td>{row['mean_urial']:+.4f}</td>" in report
    assert gain_cell in report and "<th>URIAL (training-free)</th>" in report
    assert "Reward (A vs the URIAL baseline, training-free)" in report


def test_urial_model_without_a_baseline(setup):
    root, _, common = setup
    out = root / "eval_model"
    summary = run_eval(overrides={**common, "model": str(root / "aligned"), "urial": True,
                                  "urial_model": str(root / "aligned"), "output_dir": str(out)})["summary"]
    answers = [json.loads(line)["completion"] for line in (out / "urial_samples.jsonl").read_text().splitlines()]
    assert answers == urial_generate(root, "aligned", common, "generated_aligned")
    assert summary["urial"]["model"] == str(root / "aligned") and "rewards_b" not in summary
    assert f"{root / 'aligned'} + URIAL (training-free)" in (out / "report.html").read_text()


def test_urial_without_a_model_to_prompt_is_refused(setup):
    root, _, common = setup
    with pytest.raises(ConfigError, match="config key 'urial': .*--baseline BASE_DIR") as error:
        run_eval(overrides={**common, "model": str(root / "aligned"), "urial": True,
                            "output_dir": str(root / "refused")})
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="config key 'urial_model': .*--urial true"):
        run_eval(overrides={**common, "model": str(root / "aligned"), "urial_model": str(root / "base"),
                            "output_dir": str(root / "refused")})
    assert not (root / "refused").exists()


def test_urial_answers_must_match_the_prompts():
    with pytest.raises(AlignkitError, match="urial_responses: 1 answers for 2 prompts; give one answer per prompt"):
        evaluate_responses(["w1", "w2"], ["w3", "w4"], word_value_reward, extras=EvalExtras(urial_responses=["w5"]))


def word_value_reward(prompts, responses):
    return [word_value(p, r) for p, r in zip(prompts, responses)]
