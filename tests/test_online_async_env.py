"""Async rollouts with a multi-turn environment: a tiny chat policy talks to a scripted tool environment (each turn
answered by a tool message, 1 to 3 turns) while the learner trains. N = 0 is the synchronous run; with N = 1 every
trained token carries version max(0, r - 1) and the environment's tokens carry no loss; a run stopped mid-way
resumes to the uninterrupted run's metrics, conversations and weights."""

from __future__ import annotations

import pytest
import torch

from alignkit.envs import EnvError, Step
from alignkit.online import OnlineInputs, online_config, run_online
from alignkit.online.producer import sampling_version
from alignkit.online.rollout import training_examples
from alignkit.train.reference import score_examples
from envs_support import chat_model, chat_tokenizer
from test_online_async import ASYNC_KEYS, assert_resumed_as_straight, record_versions
from test_online_guarantees import crash_in_round, rollout_lines, without_timing

pytestmark = pytest.mark.usefixtures("one_thread")
QUESTIONS = ["what is two", "what is three", "what is five", "hello what", "the sum of two", "try the answer"]


class ToolParity:
    """A scripted tool environment: an answer with an odd number of words is answered by a tool message and the
    conversation goes on (3 assistant turns at most); each answer is rewarded its length in words / 10."""

    tools: list = []

    def reset(self, row):
        self.turns = 0
        return list(row["prompt"])

    def step(self, message):
        self.turns += 1
        words = len(message["content"].split())
        done = words % 2 == 0 or self.turns >= 3
        return Step([] if done else [{"role": "tool", "content": "5"}], words / 10, done, {})

    def close(self):
        pass


def run(tmp_path, name: str, staleness: int | None, **overrides):
    tokenizer = chat_tokenizer()
    records = [{"prompt": [{"role": "user", "content": q}]} for q in QUESTIONS]
    settings = dict(method="grpo", model="tiny", prompts="-", output_dir=str(tmp_path / name), rounds=4,
                    prompts_per_round=2, num_samples=3, environment="test_online_async_env:ToolParity", max_turns=3,
                    max_length=128, max_tokens_per_batch=1024, learning_rate=1e-3, eval_samples=1,
                    eval_before_after=False, progress=False, seed=0,
                    sampling={"max_new_tokens": 5, "engine": "fast", "temperature": 1.0})
    settings.update(overrides)
    if staleness is not None:
        settings["async"] = {"max_staleness": staleness}
    return run_online(online_config(settings), chat_model(tokenizer), tokenizer,
                      OnlineInputs(records, records[:2], lambda prompts, texts: [0.0] * len(texts)))


def test_staleness_zero_with_an_environment_equals_the_synchronous_run(tmp_path):
    sync, zero = run(tmp_path, "sync", None, epochs=2), run(tmp_path, "zero", 0, epochs=2)
    assert max(row["turns"] for row in sync.rounds) > 1  # conversations went on past their first answer
    stripped = [{k: v for k, v in row.items() if k not in ASYNC_KEYS} for row in zero.rounds]
    assert without_timing(stripped) == without_timing(sync.rounds)
    assert rollout_lines(tmp_path / "zero") == rollout_lines(tmp_path / "sync")
    for name, tensor in sync.model.state_dict().items():
        assert torch.equal(zero.model.state_dict()[name], tensor), name


def test_conversation_tokens_carry_their_version_and_environment_tokens_none(tmp_path, monkeypatch):
    """With N = 1, round r's sampled tokens carry version max(0, r - 1), their engine log-probs are those of the policy
    saved at that version, and the tool replies in between are in the sequences but carry no version and no loss."""
    snapshots, rollouts, runs = record_versions(monkeypatch)
    result = run(tmp_path, "async", 1)
    assert [row["staleness"] for row in result.rounds] == [0, 1, 1, 1]
    scorer, environment_tokens = chat_model(chat_tokenizer()), 0
    for r, rollout in rollouts.items():
        examples, engine_logps, _ = training_examples(rollout)
        for example, versions in zip(examples, rollout.token_versions):
            masks = example.response_loss_masks
            assert len(versions) == sum(example.trained_lengths) == sum(sum(m) for m in masks)
            assert set(versions.tolist()) == {sampling_version(r, 1)}
            environment_tokens += sum(len(m) - sum(m) for m in masks)
        scorer.load_state_dict(snapshots[sampling_version(r, 1)])
        sampled_by = torch.cat(score_examples(scorer, examples, runs[0].packing)[1])
        assert torch.allclose(sampled_by, torch.cat(engine_logps), atol=1e-4), f"round {r + 1}"
        if r >= 2:  # the learner moved past the sampling version: its log-probs differ from the engine's
            scorer.load_state_dict(snapshots[r])
            current = torch.cat(score_examples(scorer, examples, runs[0].packing)[1])
            assert (current - torch.cat(engine_logps)).abs().max() > 1e-3
    assert environment_tokens > 0  # tool replies sat between the answers
    assert all("engine_ratio_masked" in row for row in result.rounds)  # auto: decoupled


def test_a_stopped_async_run_with_an_environment_resumes_exactly(tmp_path):
    common = dict(rounds=4, save_every=1, keep_last=10, epochs=2)
    run(tmp_path, "straight", 1, **common)
    crash_in_round(3, lambda: run(tmp_path, "stopped", 1, **common))  # round 3 was sampled ahead
    assert (tmp_path / "stopped" / "checkpoints" / "step-00000002" / "inflight_rollouts.pt").exists()
    resumed = run(tmp_path, "stopped", 1, **common)
    assert [row["round"] for row in resumed.rounds] == [3, 4]
    assert_resumed_as_straight(tmp_path / "stopped", tmp_path / "straight")


PARTIAL = {"async": {"max_staleness": 2, "partial": True}}


def test_partial_conversations_carry_each_turns_segment_version(tmp_path, monkeypatch):
    """Partial rollouts with an environment (N = 2, 3 turns: turn 1 in the first segment, turns 2-3 in the second):
    each trained token carries the version of its turn's segment, and its engine log-prob is that version's."""
    snapshots, rollouts, runs = record_versions(monkeypatch)
    result = run(tmp_path, "partial", None, rounds=5, **PARTIAL)
    scorer, crossed = chat_model(chat_tokenizer()), False
    for r, rollout in rollouts.items():
        examples, engine_logps, _ = training_examples(rollout)
        for example, versions in zip(examples, rollout.token_versions):
            turns = torch.tensor([t for ts in example.extras["turns"] for t in ts])
            assert torch.equal(versions, torch.clamp(r - 2 + (turns >= 1).long(), min=0)), f"round {r + 1}"
        versions, sampled = torch.cat(rollout.token_versions), torch.cat(engine_logps)
        crossed |= len(set(versions.tolist())) == 2
        for version in set(versions.tolist()):
            scorer.load_state_dict(snapshots[version])
            scored = torch.cat(score_examples(scorer, examples, runs[0].packing)[1])
            assert torch.allclose(scored[versions == version], sampled[versions == version], atol=1e-4)
    assert crossed and all(row["token_staleness"] < 2 for row in result.rounds[2:])


def test_a_stopped_partial_run_with_an_environment_replays_and_resumes_exactly(tmp_path):
    """The checkpoint keeps round 4's first turns without their environments; the resumed run rebuilds each
    environment by replaying its turns, then samples the rest as the uninterrupted run did."""
    common = dict(rounds=4, save_every=1, keep_last=10, epochs=2, **PARTIAL)
    run(tmp_path, "straight", None, **common)
    crash_in_round(3, lambda: run(tmp_path, "stopped", None, **common))
    resumed = run(tmp_path, "stopped", None, **common)
    assert [row["round"] for row in resumed.rounds] == [3, 4]
    assert_resumed_as_straight(tmp_path / "stopped", tmp_path / "straight")


class Drifting(ToolParity):
    """ToolParity whose tool answers change from one instance to the next: a replay cannot rebuild it."""

    made = 0

    def reset(self, row):
        Drifting.made += 1
        self.instance = Drifting.made
        return super().reset(row)

    def step(self, message):
        step = super().step(message)
        return step._replace(messages=[{**m, "content": str(self.instance)} for m in step.messages])


def test_resuming_a_partial_run_whose_environment_answers_otherwise_names_it(tmp_path):
    common = dict(rounds=4, save_every=1, keep_last=10, environment="test_online_async_env:Drifting", **PARTIAL)
    crash_in_round(3, lambda: run(tmp_path, "stopped", None, **common))
    with pytest.raises(EnvError, match="answered differently from the first time"):
        run(tmp_path, "stopped", None, **common)
