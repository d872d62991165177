"""The GRPO family online on the tiny model: DAPO's dynamic sampling (tied groups dropped, the round refilled, the
refill cap honoured), overlong shaping in the rollout's rewards, the per-round metrics users watch, every family
method training through the shared step, and a verifiable constraint reward that rises."""

from __future__ import annotations

import copy

import pytest
import torch

from alignkit.config import SamplingOptions
from alignkit.online import OnlineInputs, online_config, run_online
from alignkit.online.rollout import RolloutShape, generate_rollout
from alignkit.online.sampling import refill_prompts, tied_groups
from alignkit.rewards.base import FunctionReward
from alignkit.rewards.verifiable import ConstraintReward
from synthetic_task import prompts
from test_online_guarantees import rollout_lines, values

pytestmark = pytest.mark.usefixtures("one_thread")

# A reward that ties for every sample of prompts containing "rate" (all get 0), and is the sentiment share else.
POSITIVE = {"good", "great", "happy", "love", "nice", "wonderful", "excellent", "fine", "best", "bright"}


def share_positive(response: str) -> float:
    words = response.split()
    return sum(w in POSITIVE for w in words) / max(len(words), 1)


def tie_on_rate(prompt, response):
    return 0.0 if "rate" in prompt else share_positive(response)


def run(task, method, out, reward, train_prompts=None, **overrides):
    cfg = online_config(values(method, out, **overrides))
    return run_online(cfg, copy.deepcopy(task.model), task.tokenizer,
                      OnlineInputs(train_prompts or prompts(64, seed=31), prompts(8, seed=32), reward))


def test_tied_groups():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [float("nan"), 2.0, 2.0], [float("nan"), 1.0, 3.0],
                            [float("nan"), float("nan"), 1.0]])
    assert tied_groups(rewards).tolist() == [True, False, True, False, True]


def test_dynamic_sampling_drops_tied_groups_and_refills(task, tmp_path):
    train_prompts = prompts(64, seed=31)
    share_rate = sum("rate" in p for p in train_prompts) / len(train_prompts)
    assert 0.1 < share_rate < 0.6  # the case drops some groups, not all
    result = run(task, "dapo", tmp_path, FunctionReward(tie_on_rate), train_prompts, rounds=3, max_refills=4)
    for row, line in zip(result.rounds, rollout_lines(tmp_path)):
        assert row["kept_groups"] == 8 and row["examples"] == 8  # refilled up to prompts_per_round
        assert row["refills"] >= 1 or row["zero_std_share"] == 0
        assert len(line["prompts"]) == 8
        for prompt, rewards in zip(line["prompts"], line["rewards"]):
            assert "rate" not in prompt and max(rewards) > min(rewards)  # only groups with a signal are trained
    assert any(row["zero_std_share"] > 0 for row in result.rounds)
    # without dynamic sampling, the tied groups stay in the batch
    plain = run(task, "dapo", tmp_path / "plain", FunctionReward(tie_on_rate), train_prompts, rounds=3,
                dynamic_sampling=False)
    assert any("rate" in p for line in rollout_lines(tmp_path / "plain") for p in line["prompts"])
    assert all("refills" not in row for row in plain.rounds)


def test_dynamic_sampling_honours_the_refill_cap(task, tmp_path):
    always_tied = FunctionReward(lambda p, r: 1.0)
    result = run(task, "dapo", tmp_path, always_tied, rounds=2, max_refills=2)
    for row in result.rounds:
        assert (row["refills"], row["kept_groups"], row["examples"]) == (2, 0, 0)
        assert "updates" not in row  # nothing to train on: no optimizer step
    assert refill_prompts(list("abcdef"), 4, 0, 1, 1) == refill_prompts(list("abcdef"), 4, 0, 1, 1)
    assert refill_prompts(list("abcdef"), 4, 0, 1, 1) != refill_prompts(list("abcdef"), 4, 0, 1, 2)


def test_overlong_shaping_enters_the_rollout_rewards(task, tmp_path):
    """reward + DAPO's penalty on the sampled token count: 0 up to 8 of 10 tokens, then -(n - 8) / 2."""
    rollout = generate_rollout(task.model, task.tokenizer, prompts(8, seed=5), FunctionReward(lambda p, r: 0.5),
                               SamplingOptions(max_new_tokens=10), RolloutShape(4, overlong=(10, 2, 1.0), seed=1))
    lengths = torch.tensor([[len(ids) for ids in e.response_ids] for e in rollout.examples]).float()
    expected = 0.5 - torch.where(lengths <= 8, torch.zeros_like(lengths), (lengths - 8) / 2)
    torch.testing.assert_close(rollout.rewards, expected)
    assert (lengths > 8).any() and (lengths <= 8).any()  # both branches
    result = run(task, "grpo", tmp_path, FunctionReward(lambda p, r: 0.0), rounds=1, max_new_tokens=10,
                 overlong_cache=4, kl_coef=0.0)
    assert any(r < 0 for rs in rollout_lines(tmp_path)[0]["rewards"] for r in rs)
    assert result.rounds[0]["response_length"] > 0


@pytest.mark.parametrize("method,options", [("dapo", {}), ("gspo", {}), ("cispo", {"weight_max": 1.05}),
                                            ("reinforce++", {})])
def test_family_methods_train_and_report(task, tmp_path, method, options):
    """The second epoch is off-policy, so some ratios leave the clip range (GSPO's 3e-4 / 4e-4 included)."""
    result = run(task, method, tmp_path, FunctionReward(lambda p, r: share_positive(r)), rounds=2, epochs=2,
                 **options)
    for row in result.rounds:
        for key in ("entropy", "response_length", "truncated_share", "zero_std_share", "clip_low", "clip_high"):
            assert key in row, (method, key)
        assert row["entropy"] > 0 and row["updates"] == 2
    assert any(row["clip_low"] + row["clip_high"] > 0 for row in result.rounds)
    assert result.rounds[0]["loss"] == result.rounds[0]["loss"]  # finite


def test_a_constraint_reward_rises(task, tmp_path):
    """The tiny model learns to meet two checkable constraints (use "great", at most 6 words) under DAPO."""
    train_prompts = prompts(64, seed=31)
    records = [{"prompt": p, "constraints": [{"type": "include", "words": ["great"]}, {"type": "max_words", "n": 6}]}
               for p in train_prompts + prompts(8, seed=32)]
    reward = ConstraintReward().bind(records)
    result = run(task, "dapo", tmp_path, reward, train_prompts, rounds=12, learning_rate=3e-3, max_new_tokens=12)
    start = sum(r["rollout_reward"] for r in result.rounds[:2]) / 2
    end = sum(r["rollout_reward"] for r in result.rounds[-2:]) / 2
    assert end > start + 0.15, (start, end)


def test_dynamic_sampling_resumes_exactly(task, tmp_path):
    """Refill prompts and seeds depend on the round only: a crash and resume redraws the same refills."""
    from alignkit.train.logging import read_metrics
    from test_online_guarantees import crash_in_round, without_timing

    common = dict(rounds=3, save_every=1, keep_last=5, max_refills=3)
    reward = FunctionReward(tie_on_rate)
    straight = run(task, "dapo", tmp_path / "straight", reward, **common)
    crash_in_round(2, lambda: run(task, "dapo", tmp_path / "crashed", reward, **common))
    resumed = run(task, "dapo", tmp_path / "crashed", reward, **common)
    assert [r["round"] for r in resumed.rounds] == [2, 3]
    assert any(r["refills"] > 0 for r in straight.rounds)
    assert without_timing(read_metrics(tmp_path / "crashed")) == without_timing(read_metrics(tmp_path / "straight"))
    assert rollout_lines(tmp_path / "crashed") == rollout_lines(tmp_path / "straight")
