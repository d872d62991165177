"""Training on multi-turn trajectories: PPO through `alignkit online` with an environment (the loss, value and advantage
masks on exactly the assistant tokens; GAE over them, the environment's skipped, against a NumPy recursion over the
whole conversation), and every segment of a forked conversation trained, with its conversation's advantage."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from alignkit.cli import main
from alignkit.data.load import write_jsonl_atomic
from alignkit.data.pack import pack
from alignkit.envs import Limits, Step, load_environment
from alignkit.losses import build_options, get_loss
from alignkit.models.value_head import PolicyWithValueHead
from alignkit.online import env_rollout
from alignkit.online.advantages import RunningMoments
from alignkit.online.env_rollout import EnvironmentSetup, environment_rollout
from alignkit.online.experience import (
    RoundContext,
    Scorer,
    ppo_experience,
    reinforce_experience,
    rl_experience,
)
from alignkit.online.methods import ONLINE_METHODS, OnlineMethod
from alignkit.online.rollout import RolloutShape, join_rollouts, select_groups, training_examples
from alignkit.train.packing import Packing
from envs_support import FORGETFUL_TEMPLATE, SAMPLING, ScriptedEngine, chat_model, chat_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def skipping_gae(rewards, values, mask, gamma: float, lam: float):
    """GAE over a whole conversation, tokens where mask is 0 (the environment's) skipped: they neither bootstrap nor
    carry the running advantage (verl's recursion for multi-turn responses). NumPy, from the formula."""
    advantages = np.zeros(len(rewards))
    next_value = running = 0.0
    for t in reversed(range(len(rewards))):
        if mask[t]:
            running = rewards[t] + gamma * next_value - values[t] + gamma * lam * running
            next_value = values[t]
        advantages[t] = running
    return advantages, advantages + values


def slots(flat: torch.Tensor, lengths: list[int]) -> list[np.ndarray]:
    return [part.numpy().astype(np.float64) for part in torch.split(flat, lengths)]


def test_ppo_trains_on_trajectories_with_its_masks_on_exactly_the_assistant_tokens(tmp_path, monkeypatch):
    tokenizer = chat_tokenizer()
    chat_model(tokenizer).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    questions = ["what is the sum of two", "what is three", "what is five", "hello what"]
    write_jsonl_atomic(tmp_path / "prompts.jsonl", [{"prompt": [{"role": "user", "content": q}]} for q in questions])
    trajectories, experiences = [], []
    real_run = env_rollout.run_trajectories
    monkeypatch.setattr(env_rollout, "run_trajectories",
                        lambda *a, **k: trajectories.append(real_run(*a, **k)) or trajectories[-1])
    ppo = ONLINE_METHODS["ppo"]

    def recording(rollout, round_ctx):
        experiences.append(ppo.experience(rollout, round_ctx))
        return experiences[-1]

    monkeypatch.setitem(ONLINE_METHODS, "ppo", OnlineMethod(ppo.loss, recording, ppo.paper, value_head=True))
    options = {"reward_norm": "none", "reward_clip": 0.0, "whiten_advantages": False, "kl_reward_coef": 0.05,
               "gamma": 0.9, "lam": 0.8}
    config = {"method": "ppo", "model": str(tmp_path / "model"), "prompts": str(tmp_path / "prompts.jsonl"),
              "environment": "envs_support:Notebook", "max_turns": 3, "reward": "envs_support:word_count",
              "rounds": 2, "prompts_per_round": 2, "num_samples": 3, "learning_rate": 1e-3, "max_length": 256,
              "sampling": {"max_new_tokens": 8, "engine": "hf"}, "eval_before_after": False, "seed": 0,
              "progress": False, "output_dir": str(tmp_path / "run"), "loss_options": options}
    (tmp_path / "ppo.yaml").write_text(yaml.safe_dump(config))
    assert main(["online", "--config", str(tmp_path / "ppo.yaml")]) == 0
    rounds = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rounds) == 2 and all(np.isfinite(r["loss"]) and np.isfinite(r["value_loss"]) for r in rounds)
    assert (tmp_path / "run" / "final" / "value_head.safetensors").exists()
    assert len(trajectories) == len(experiences) == 2
    environment_tokens = 0
    for round_trajectories, experience in zip(trajectories, experiences):  # round 2: the policy moved, so KL != 0
        assert len(experience.examples) == 2  # no fork: one example per record
        for b, example in enumerate(experience.examples):
            lengths = example.trained_lengths
            values, old, advantages, returns = (slots(experience.per_token[name][b], lengths) for name in (
                "old_values", "old_token_logps", "advantages", "returns"))
            ref = slots(experience.reference.token_logps[b], lengths)
            batch = pack([example])
            for i, trajectory in enumerate(round_trajectories[b * 3:(b + 1) * 3]):
                ids, mask = trajectory.ids, trajectory.loss_mask
                start = len(example.prompt_ids)
                assert ids[:start] == example.prompt_ids and ids[start:] == example.response_ids[i]
                sampled = [t for t, m in zip(ids[start:], mask[start:]) if m]
                # the tokens the learner trains (the packed batch's targets) are the sampled ones, in order
                assert batch.token_targets[batch.token_seq == i].tolist() == sampled
                assert len(values[i]) == len(advantages[i]) == len(returns[i]) == len(sampled) > 0
                environment_tokens += sum(1 for m in mask[start:] if not m)
                # a NumPy GAE over the whole conversation, the environment's tokens given values it must ignore
                where = np.flatnonzero(np.array(mask[start:]) == 1)
                full_values = np.full(len(mask) - start, 1e6)
                full_values[where] = values[i]
                rewards = np.zeros(len(mask) - start)
                rewards[where] = -0.05 * (old[i] - ref[i])
                rewards[where[-1]] += float(experience.per_response["rewards"][b, i])
                expected_adv, expected_ret = skipping_gae(rewards, full_values, mask[start:], 0.9, 0.8)
                np.testing.assert_allclose(advantages[i], expected_adv[where], rtol=1e-5, atol=1e-5)
                np.testing.assert_allclose(returns[i], expected_ret[where], rtol=1e-5, atol=1e-5)
    assert environment_tokens > 0  # tool replies and user turns were in the conversations, and carried no loss


class UntilDone:
    """Ends when the answer says "done" (after at most 3 turns), rewarding its length in words."""

    tools: list = []

    def reset(self, row):
        self.turns = 0
        return [{"role": "user", "content": row["question"]}]

    def step(self, message):
        self.turns += 1
        done = "done" in message["content"].split() or self.turns == 3
        return Step([] if done else [{"role": "user", "content": "try again please"}],
                    len(message["content"].split()) / 10, done, {})

    def close(self):
        pass


def forked_rollout(k: int = 2):
    """Two records, k conversations each, under a template that drops earlier answers: every turn after the first
    forks; the first record's conversations take 2 and 3 turns, the second's 2 and 1."""
    tokenizer = chat_tokenizer(FORGETFUL_TEMPLATE)
    replies = {"two": ["hello yes", "good answer", "done", "yes", "yes done"], "three": ["no", "yes yes done", "done"]}
    engine = ScriptedEngine(tokenizer, replies)
    limits = Limits(max_turns=3, require_reward=True)
    setup = EnvironmentSetup(load_environment(UntilDone, limits), limits)
    records = [{"question": "what is two", "_row": 1}, {"question": "what is three", "_row": 2}]
    rollout = environment_rollout(engine, tokenizer, records, SAMPLING, RolloutShape(k, 256), setup)
    return tokenizer, engine, rollout


def round_context(method: str, tokenizer, trained=None, **options):
    spec = get_loss(ONLINE_METHODS[method].loss)
    cfg = SimpleNamespace(mask_truncated=False, updates_per_round=1, turn_credit="conversation")
    policy = chat_model(tokenizer, seed=1) if trained is None else trained.policy
    scorer = Scorer(trained or policy, policy, Packing(4096, None, tokenizer.pad_token_id))
    return RoundContext(cfg, build_options(spec, options), scorer, None, RunningMoments(), None)


def test_every_segment_of_a_forked_conversation_trains_with_its_conversations_advantage(monkeypatch):
    captured = []
    real_run = env_rollout.run_trajectories
    monkeypatch.setattr(env_rollout, "run_trajectories",
                        lambda *a, **k: captured.append(real_run(*a, **k)) or captured[-1])
    tokenizer, engine, rollout = forked_rollout()
    [trajectories] = captured
    assert [t.forks for t in trajectories] == [1, 2, 1, 0] and rollout.stats["forks"] == 4.0
    assert rollout.finished.all()  # a forked conversation that ended is finished: all of it trains
    examples, engine_logps, rows = training_examples(rollout)
    assert rows == [0, 1, 0, 0, 1]  # each record's first segments, then its later levels
    for b in range(2):
        for i in range(2):
            trajectory = trajectories[b * 2 + i]
            expected = [t for s in trajectory.segments for t, m in zip(s.ids, s.loss_mask) if m]
            expected_logps = [lp for s in trajectory.segments for lp, m in zip(s.engine_logps, s.loss_mask) if m]
            trained, logps = [], []
            for j in (j for j, row in enumerate(rows) if row == b):
                batch = pack([examples[j]])
                trained += batch.token_targets[batch.token_seq == i].tolist()  # what the learner trains
                first = sum(examples[j].trained_lengths[:i])
                logps += engine_logps[j][first:first + examples[j].trained_lengths[i]].tolist()
            assert trained == expected
            assert logps == pytest.approx(expected_logps)
    # every token the engine sampled is trained once: the union of all segments' sampled tokens
    assert sum(sum(e.trained_lengths) for e in examples) == sum(len(ids) for _, ids in engine.calls)
    # GRPO: a segment's slot holds its record's rewards, so it takes its conversation's group-relative advantage
    experience = rl_experience(rollout, round_context("grpo", tokenizer))
    assert torch.equal(experience.per_response["rewards"], rollout.rewards[torch.tensor(rows)])
    # REINFORCE++: one advantage per conversation, on every token of every segment, whitened over all of them
    experience = reinforce_experience(rollout, round_context("reinforce++", tokenizer))
    rewards = rollout.rewards.numpy().astype(np.float64)
    centred = rewards - rewards.mean(1, keepdims=True)
    counts = np.zeros_like(rewards)
    for j, row in enumerate(rows):
        counts[row] += examples[j].trained_lengths
    mean = (centred * counts).sum() / counts.sum()
    expected = (centred - mean) / np.sqrt((counts * (centred - mean) ** 2).sum() / counts.sum())
    for j, row in enumerate(rows):
        for i, part in enumerate(torch.split(experience.per_token["advantages"][j], examples[j].trained_lengths)):
            np.testing.assert_allclose(part.numpy(), expected[row, i], rtol=1e-5, atol=1e-6)


def test_ppo_runs_gae_across_the_segments_of_a_forked_conversation():
    tokenizer, _, rollout = forked_rollout()
    trained = PolicyWithValueHead(chat_model(tokenizer, seed=1))
    torch.nn.init.normal_(trained.value_head.linear.weight, std=0.5)  # values that differ token to token
    ctx = round_context("ppo", tokenizer, trained, reward_norm="none", reward_clip=0.0, whiten_advantages=False,
                        kl_reward_coef=0.0, gamma=0.9, lam=0.8)
    experience = ppo_experience(rollout, ctx)
    examples, _, rows = training_examples(rollout)
    for b in range(2):
        for i in range(2):
            parts = [(j, sum(examples[j].trained_lengths[:i]), examples[j].trained_lengths[i])
                     for j, row in enumerate(rows) if row == b]
            values, advantages = (np.concatenate([experience.per_token[name][j][s:s + n].numpy() for j, s, n in parts])
                                  for name in ("old_values", "advantages"))
            rewards = np.zeros(len(values))
            rewards[-1] = float(rollout.rewards[b, i])  # the score on the conversation's last sampled token
            expected, _ = skipping_gae(rewards, values.astype(np.float64), np.ones(len(values)), 0.9, 0.8)
            np.testing.assert_allclose(advantages, expected, rtol=1e-5, atol=1e-6)


def test_joined_and_selected_rollouts_keep_each_records_later_segments():
    """Ranks' rollouts are joined, and dynamic sampling selects groups: the later segments follow their record."""
    _, _, rollout = forked_rollout()
    plain = select_groups(rollout, [0])
    plain.forked = None  # a rank whose conversations never forked
    joined = join_rollouts([rollout, plain])
    assert training_examples(joined)[2] == [0, 1, 2, 0, 0, 1]
    assert joined.forked[2] == [] and select_groups(joined, [1, 0]).forked == [rollout.forked[1], rollout.forked[0]]
    assert join_rollouts([plain, plain]).forked is None


def test_distillation_scores_every_segment_of_a_forked_conversation_with_the_teacher():
    from alignkit.online.experience import distill_experience

    tokenizer, _, rollout = forked_rollout()
    ctx = round_context("opd", tokenizer)
    ctx.teacher = chat_model(tokenizer, seed=2)
    experience = distill_experience(rollout, ctx)
    examples = experience.examples
    assert len(examples) == 5 and [len(t) for t in experience.per_token["teacher_token_logps"]] == [
        sum(e.trained_lengths) for e in examples]
