"""Environments in the online run: the multi-turn rollout keeps the single-turn layout (a record's prompt once, its k
conversations as responses) with the loss mask on the sampled tokens only and the engine's log-probs on exactly
those; a TRL-style environment class trains through `alignkit online` on a tiny model."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from alignkit.cli import main
from alignkit.data.load import write_jsonl_atomic
from alignkit.envs import EnvError, Limits, load_environment
from alignkit.errors import ConfigError
from alignkit.online import online_config
from alignkit.online.config import method_loss
from alignkit.online.env_rollout import EnvironmentSetup, environment_rollout
from alignkit.online.rollout import RolloutShape
from envs_support import (
    CHAT_TEMPLATE,
    FORGETFUL_TEMPLATE,
    SAMPLING,
    ScriptedEngine,
    chat_model,
    chat_tokenizer,
    tool_call,
)
from test_envs_adapters import Broken, Counter

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_multi_turn_rollout_trains_exactly_the_sampled_tokens():
    tokenizer = chat_tokenizer()
    records = [{"prompt": [{"role": "user", "content": "hello what"}], "target": 5, "_row": 1},
               {"prompt": [{"role": "user", "content": "what is three"}], "target": 6, "_row": 2}]
    replies = {"hello": [tool_call("add", a=2, b=3), "yes", "five"], "three": ["no", "yes"]}  # not in the tool block
    engine = ScriptedEngine(tokenizer, replies)
    limits = Limits(max_turns=3, require_reward=False)
    setup = EnvironmentSetup(load_environment(Counter, limits), limits)
    rollout = environment_rollout(engine, tokenizer, records, SAMPLING.model_copy(update={"max_new_tokens": 40}),
                                  RolloutShape(2, 256), setup)
    assert rollout.rewards.tolist() == [[1.0, 0.0], [0.0, 0.0]]  # get_reward: the first conversation added 2 + 3
    assert rollout.finished.tolist() == [[True, True], [True, True]] and rollout.stats["tool_calls"] == 0.25
    for example, logps in zip(rollout.examples, rollout.engine_logps):
        for response, mask in zip(example.response_ids, example.response_loss_masks):
            context = example.prompt_ids + response
            sampled = [call for call in engine.calls if context[:len(call[0]) + len(call[1])] == call[0] + call[1]]
            assert sum(mask) == sum(len(s) for _, s in sampled)  # every trained token was sampled, and only those
        assert len(logps) == sum(example.trained_lengths)
    assert "[tool] 5" in rollout.texts[0][0]


def test_missing_eos_penalty_falls_on_conversations_cut_by_a_limit():
    tokenizer = chat_tokenizer()
    records = [{"prompt": [{"role": "user", "content": "hello what"}], "target": 5, "_row": 1},
               {"prompt": [{"role": "user", "content": "what is three"}], "target": 6, "_row": 2}]
    replies = {"hello": [tool_call("add", a=2, b=3), "yes", "five"], "three": ["no", "yes"]}
    limits = Limits(max_turns=1, require_reward=False)
    setup = EnvironmentSetup(load_environment(Counter, limits), limits)
    sampling = SAMPLING.model_copy(update={"max_new_tokens": 40})
    plain, penalised = (environment_rollout(ScriptedEngine(tokenizer, replies), tokenizer, records, sampling,
                                            RolloutShape(2, 256, penalty), setup) for penalty in (0.0, 0.5))
    assert not plain.finished.all()  # the tool call at the only turn allowed cuts the first record's conversations
    assert torch.equal(penalised.rewards, plain.rewards - 0.5 * (~plain.finished).float())


def test_overlong_shaping_is_refused_with_environments():
    cfg = online_config({"model": "m", "prompts": "p.jsonl", "environment": "envs_support:Notebook", "method": "grpo",
                         "overlong_cache": 8})
    with pytest.raises(ConfigError, match="overlong_cache.*single answer"):
        method_loss(cfg)


class FailsOnBad(Broken):
    def __init__(self):
        super().__init__("ok")

    def reset(self, row):
        if row.get("bad"):
            raise ValueError("no such puzzle")
        return super().reset(row)


def test_an_error_names_the_record_not_its_copy():
    tokenizer = chat_tokenizer()
    limits = Limits(max_turns=1, require_reward=False)
    setup = EnvironmentSetup(load_environment(FailsOnBad, limits), limits)
    records = [{"prompt": "what is two"}, {"prompt": "what is two", "bad": True}]  # no _row: numbered in order
    with pytest.raises(EnvError, match=r"FailsOnBad, row 2: reset raised ValueError"):
        environment_rollout(ScriptedEngine(tokenizer, {"two": ["yes"] * 4}), tokenizer, records, SAMPLING,
                            RolloutShape(2, 256), setup)


def test_a_prompt_with_no_room_for_an_answer_is_a_config_error():
    tokenizer = chat_tokenizer()
    limits = Limits(max_turns=2, max_tokens=8, require_reward=False)
    setup = EnvironmentSetup(load_environment(Counter, limits), limits)
    record = {"prompt": [{"role": "user", "content": "hello what"}], "target": 5, "_row": 4}
    with pytest.raises(ConfigError, match="prompt of record 4 .Counter. leaves no room.*max_length 8"):
        environment_rollout(ScriptedEngine(tokenizer, {"hello": ["yes"] * 2}), tokenizer, [record], SAMPLING,
                            RolloutShape(2, 8), setup)


def test_environments_train_the_grpo_family_rloo_and_ppo_not_pair_methods(tmp_path):
    base = {"model": "m", "prompts": "p.jsonl", "environment": "envs_support:Notebook"}
    for method in ("grpo", "rloo", "dapo", "reinforce++", "ppo"):
        method_loss(online_config({**base, "method": method}))
    for method in ("online-dpo", "self-reward"):
        with pytest.raises(ConfigError, match=f"environment.*not {method}: preference pairs of conversations"):
            method_loss(online_config({**base, "method": method}))


def run_online_cli(tmp_path, environment: str, fields: dict, template: str = CHAT_TEMPLATE, **overrides) -> list[dict]:
    """`alignkit online` with an environment on a tiny random policy; the metrics of its rounds."""
    tokenizer = chat_tokenizer(template)
    chat_model(tokenizer).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    questions = ["what is the sum of two", "what is three", "what is five", "hello what"]
    write_jsonl_atomic(tmp_path / "prompts.jsonl",
                       [{"prompt": [{"role": "user", "content": q}], **fields} for q in questions])
    config = {"method": "grpo", "model": str(tmp_path / "model"), "prompts": str(tmp_path / "prompts.jsonl"),
              "environment": environment, "max_turns": 2, "reward": "envs_support:word_count",
              "rounds": 2, "prompts_per_round": 2, "num_samples": 3, "learning_rate": 1e-3, "max_length": 256,
              "sampling": {"max_new_tokens": 8, "engine": "hf"}, "eval_samples": 2, "seed": 0, "progress": False,
              "output_dir": str(tmp_path / "run"), **overrides}
    (tmp_path / "online.yaml").write_text(yaml.safe_dump(config))
    assert main(["online", "--config", str(tmp_path / "online.yaml")]) == 0
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def test_a_trl_environment_class_through_alignkit_online(tmp_path):
    rounds = run_online_cli(tmp_path, "envs_support:Notebook", {})
    assert len(rounds) == 2 and all(1 <= r["turns"] <= 2 and r["forks"] == 0 for r in rounds)
    assert max(r["turns"] for r in rounds) > 1  # a malformed call was answered and the conversation went on
    rollouts = [json.loads(line) for line in (tmp_path / "run" / "rollouts.jsonl").read_text().splitlines()]
    assert rollouts and all(text.startswith("[assistant] ") for r in rollouts for group in r["texts"]
                            for text in group)


@pytest.mark.parametrize("method", ["grpo", "ppo"])
def test_forked_conversations_train_through_alignkit_online(tmp_path, method):
    """A template that drops earlier answers: every later turn forks, and every segment trains."""
    rounds = run_online_cli(tmp_path, "envs_support:Notebook", {}, FORGETFUL_TEMPLATE, method=method, max_turns=3)
    assert sum(r["forks"] for r in rounds) > 0 and all(math.isfinite(r["loss"]) for r in rounds)


def test_skyrl_gym_gsm8k_multi_turn_through_alignkit_online(tmp_path):
    pytest.importorskip("skyrl_gym")
    fields = {"env_class": "gsm8k_multi_turn", "reward_spec": {"method": "rule", "ground_truth": "5"},
              "extra_info": {"max_turns": 2}}
    rounds = run_online_cli(tmp_path, "skyrl:gsm8k_multi_turn", fields)
    assert len(rounds) == 2 and all(r["turns"] == 2 for r in rounds)  # a random policy never answers "#### 5"


def online_env_config(tmp_path, name: str, **overrides) -> dict:
    return {"method": "grpo", "model": str(tmp_path / "model"), "prompts": str(tmp_path / "prompts.jsonl"),
            "environment": "envs_support:Notebook", "max_turns": 2, "reward": "envs_support:word_count",
            "rounds": 3, "prompts_per_round": 2, "num_samples": 3, "learning_rate": 1e-3, "max_length": 256,
            "sampling": {"max_new_tokens": 8, "engine": "hf"}, "evaluate": False, "seed": 0, "progress": False,
            "save_every": 1, "output_dir": str(tmp_path / name), **overrides}


def test_a_crashed_run_with_an_environment_resumes_to_the_same_conversations_and_weights(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from alignkit.online import run as online_run
    from alignkit.online import run_online

    tokenizer = chat_tokenizer()
    chat_model(tokenizer).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    write_jsonl_atomic(tmp_path / "prompts.jsonl", [{"prompt": [{"role": "user", "content": q}]} for q in
                                                    ["what is two", "what is three", "what is five", "hello what"]])
    run_online(online_config(online_env_config(tmp_path, "straight")))
    real, calls = online_run.OnlineRun.learn, [0]

    def crashing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(online_run.OnlineRun, "learn", crashing)
    with pytest.raises(KeyboardInterrupt):
        run_online(online_config(online_env_config(tmp_path, "crashed")))
    monkeypatch.setattr(online_run.OnlineRun, "learn", real)
    run_online(online_config(online_env_config(tmp_path, "crashed")))  # resumes from round 2's checkpoint

    def lines(name, file):
        rows = [json.loads(line) for line in (tmp_path / name / file).read_text().splitlines()]
        return [{k: v for k, v in row.items() if not k.startswith(("time/", "samples_per_s", "tokens_per_s"))}
                for row in rows]

    assert lines("crashed", "metrics.jsonl") == lines("straight", "metrics.jsonl")
    assert lines("crashed", "rollouts.jsonl") == lines("straight", "rollouts.jsonl")
    final, expected = (load_file(tmp_path / n / "final" / "model.safetensors") for n in ("crashed", "straight"))
    assert all(torch.equal(final[key], expected[key]) for key in expected)
