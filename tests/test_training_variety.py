"""Variety in the training prompts (prompts.vary_training): each instruction in one of its training wordings, and
single-constraint records of types the pairs leave out, drawn from their own rng so the held-out sets do not move;
and the recipe's training reward with the degeneracy guard (flag_reward)."""

from __future__ import annotations

import pytest

from alignkit.config import load_command_config
from alignkit.errors import ConfigError
from alignkit.recipes.rl import ONLINE, PROMPT_SETS, TYPES, RLConfig, training_reward
from alignkit.recipes.stages import online_option_names
from alignkit.rewards.verifiable.constraints import describe, describe_training, n_training_wordings
from alignkit.rewards.verifiable.degenerate import DegenerateGuard
from alignkit.rewards.verifiable.prompts import prompt_sets, task_of, vary_training, write_prompt_sets

SINGLES = ("min_words", "exclude")


def canonical(n: int = 120) -> list[dict]:
    return prompt_sets(TYPES, n, 16, seed=0)[0]


def wording_of(spec: dict, text: str) -> int:
    found = [k for k in range(n_training_wordings(spec["type"])) if describe_training(spec, k) in text]
    assert len(found) == 1, (spec, text)
    return found[0]


def test_each_instruction_is_drawn_in_a_training_wording_on_the_same_task():
    records = canonical()
    varied = vary_training(records, seed=0)
    assert varied == vary_training(records, seed=0) and varied != vary_training(records, seed=1)
    used = {}
    for before, after in zip(records, varied):
        assert after["constraints"] == before["constraints"]
        text = after["prompt"][0]["content"]
        assert text.startswith(task_of(before) + " ")
        for spec in after["constraints"]:
            used.setdefault(spec["type"], set()).add(wording_of(spec, text))
    # every type of the pairs is trained in every one of its wordings, the checker's own included
    assert all(used[t] == set(range(n_training_wordings(t))) for t in TYPES)


def test_without_variety_the_records_are_unchanged():
    records = canonical()
    assert vary_training(records, wordings=False) == records


def test_every_nth_record_becomes_one_constraint_of_the_single_types_in_turn():
    records = canonical()
    varied = vary_training(records, seed=0, wordings=False, single_types=SINGLES, single_every=4)
    for i, (before, after) in enumerate(zip(records, varied)):
        if i % 4 == 3:
            assert [c["type"] for c in after["constraints"]] == [SINGLES[(i // 4) % 2]]
            assert after["prompt"][0]["content"] == task_of(before) + " " + describe(after["constraints"][0])
        else:
            assert after == before


def test_variety_leaves_the_held_out_set_as_it_was(tmp_path):
    write_prompt_sets(tmp_path / "plain", TYPES, 64, 32, 0)
    write_prompt_sets(tmp_path / "varied", TYPES, 64, 32, 0, {"single_types": SINGLES, "single_every": 3})
    read = lambda d, n: (tmp_path / d / n).read_text()  # noqa: E731
    assert read("plain", "rl_eval.jsonl") == read("varied", "rl_eval.jsonl")
    assert read("plain", "rl_train.jsonl") != read("varied", "rl_train.jsonl")


@pytest.mark.parametrize(("options", "message"), [
    ({"single_types": ("haiku",), "single_every": 4}, "unknown constraint types"),
    ({"single_types": SINGLES, "single_every": 0}, "single_every must be >= 1"),
])
def test_bad_variety_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        vary_training(canonical(8), **options)


def test_a_record_not_in_the_training_wording_is_refused():
    record = vary_training(canonical(8), seed=0)
    reworded = next(r for r in record if any(wording_of(s, r["prompt"][0]["content"]) for s in r["constraints"]))
    with pytest.raises(ValueError, match="not a prompt_sets record in the training wording"):
        task_of(reworded)


def test_the_shipped_training_set_is_in_the_checkers_wording_and_the_guard_is_on():
    """The pilots chose the flag guard without the variety (docs/online.md): every shipped training record is a
    prompt_sets pair in the checkers' own wording, and the job's reward is guarded."""
    import json

    from alignkit.recipes.rl import shipped

    assert PROMPT_SETS["variety"] is None
    with open(shipped("rl_train.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    assert records == prompt_sets(TYPES, PROMPT_SETS["n_train"], PROMPT_SETS["n_eval"], PROMPT_SETS["seed"])[0]
    assert all(len(r["constraints"]) == 2 for r in records)
    assert isinstance(training_reward(RLConfig()), DegenerateGuard)


def config(**overrides) -> RLConfig:
    return load_command_config(RLConfig, None, overrides, online_option_names(ONLINE))


def test_flag_reward_scores_a_flagged_answer_and_leaves_the_others():
    record = {"prompt": "Tell me about kites. Include at least 2 placeholders in square brackets, like [name].",
              "constraints": [{"type": "placeholders", "n": 2}]}
    copied = "Kites fly high above [name] and [name] on windy days at the beach."  # the example twice: flagged
    honest = "Kites fly high above [city] and [park] on windy days at the beach."
    plain = training_reward(config(flag_reward=None)).bind([record])
    guarded = training_reward(config(flag_reward=-0.5)).bind([record])
    assert isinstance(guarded, DegenerateGuard) and not isinstance(plain, DegenerateGuard)
    assert plain([record["prompt"]] * 2, [copied, honest]) == [2.0, 2.0]
    assert guarded([record["prompt"]] * 2, [copied, honest]) == [-0.5, 2.0]


@pytest.mark.parametrize("value", [float("nan"), "high"])
def test_a_bad_flag_reward_is_named(value):
    with pytest.raises(ConfigError, match="flag_reward"):
        config(flag_reward=value)
