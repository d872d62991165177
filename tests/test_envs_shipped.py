"""The two shipped environments: self-correction (SCoRe) on the constraint prompts, scored r2 + alpha * (r2 - r1) with
the checkers' verdict as the feedback turn, and tool use on arithmetic word problems with the sandboxed calculate
tool and an exact-answer reward; both with seeded, disjoint training and held-out sets."""

from __future__ import annotations

import re

import pytest

from alignkit.envs import Limits, load_environment, run_trajectories
from alignkit.envs.arithmetic import (
    INSTRUCTION,
    ONE_STEP,
    PROBLEMS,
    ArithmeticTools,
    arithmetic_report,
    arithmetic_sets,
)
from alignkit.envs.self_correction import (
    ALL_MET,
    SelfCorrection,
    feedback,
    self_correction_report,
    self_correction_sets,
)
from alignkit.rewards.verifiable.constraints import validate_constraints
from envs_support import SAMPLING, ScriptedEngine, chat_tokenizer, tool_call

LONG = SAMPLING.model_copy(update={"max_new_tokens": 40})
CONSTRAINTS = [{"type": "max_words", "n": 2}, {"type": "include", "words": ["good"]}]


def test_self_correction_feedback_names_the_broken_instructions_and_rewards_progress():
    tokenizer = chat_tokenizer()
    row = {"prompt": [{"role": "user", "content": "what is two"}], "constraints": CONSTRAINTS}
    engine = ScriptedEngine(tokenizer, {"two": ["hello yes no", "good answer"]})
    [trajectory] = run_trajectories(engine, tokenizer, [SelfCorrection(alpha=0.5)], [row], LONG, Limits(max_turns=2))
    verdict = trajectory.messages[2]
    assert verdict["role"] == "user" and "Answer in at most 2 words." in verdict["content"]
    assert 'Include the word "good".' in verdict["content"]
    assert trajectory.turn_rewards == [0.0, 1.0 + 0.5 * (1.0 - 0.0)] and trajectory.reward == 1.5 and trajectory.done
    report = self_correction_report([trajectory])
    assert (report["first_compliance"], report["second_compliance"], report["wrong_to_right"]) == (0.0, 1.0, 1.0)


def test_self_correction_rewards_are_scores_progress_and_regress():
    env = SelfCorrection(alpha=1.0)
    env.reset({"prompt": "x", "constraints": CONSTRAINTS})
    first = env.step({"role": "assistant", "content": "good answer"})
    assert first.reward == 1.0 and first.messages[0]["content"] == ALL_MET and not first.done
    second = env.step({"role": "assistant", "content": "no no no"})
    assert second.reward == 0.0 + 1.0 * (0.0 - 1.0) and second.info["first_all_met"] and not second.info[
        "second_all_met"]
    specs = validate_constraints([{"type": "no_commas"}, {"type": "lowercase"}])
    assert feedback(specs, [False, True]) == ("Your answer does not follow these instructions: Do not use any "
                                              "commas. Write your answer again so that it follows every instruction.")


def test_self_correction_sets_are_seeded_and_disjoint():
    train, held = self_correction_sets(40, 12, seed=3)
    assert (train, held) == self_correction_sets(40, 12, seed=3) and (len(train), len(held)) == (40, 12)
    combos = lambda records: {tuple(sorted(c["type"] for c in r["constraints"])) for r in records}  # noqa: E731
    assert not combos(train) & combos(held)
    assert self_correction_sets(40, 12, seed=4)[0] != train


def test_arithmetic_tool_use_calls_calculate_and_scores_the_exact_answer():
    tokenizer = chat_tokenizer()
    rows = [{"prompt": [{"role": "user", "content": "what is two"}], "answer": "6"},
            {"prompt": [{"role": "user", "content": "what is three"}], "answer": "6"}]
    engine = ScriptedEngine(tokenizer, {"two": [tool_call("calculate", expression="2*3"), "6"], "three": ["7"]})
    trajectories = run_trajectories(engine, tokenizer, [ArithmeticTools(), ArithmeticTools()], rows, LONG)
    assert trajectories[0].messages[2] == {"role": "tool", "name": "calculate", "content": "6"}
    assert [t.reward for t in trajectories] == [1.0, 0.0] and [t.turns for t in trajectories] == [2, 1]
    assert arithmetic_report(trajectories) == {"accuracy": 0.5, "tool_call_rate": 0.5,
                                               "tool_errors_per_trajectory": 0.0}
    assert '"name": "calculate"' in tokenizer.decode(engine.calls[0][0])  # the tool block of the default format


def test_an_arithmetic_trajectory_out_of_turns_scores_zero():
    tokenizer = chat_tokenizer()
    row = {"prompt": [{"role": "user", "content": "what is two"}], "answer": "6"}
    engine = ScriptedEngine(tokenizer, {"two": [tool_call("calculate", expression="2*3")]})
    [trajectory] = run_trajectories(engine, tokenizer, [ArithmeticTools()], [row], LONG, Limits(max_turns=1))
    assert trajectory.limit == "max_turns" and trajectory.reward == 0.0


def test_arithmetic_sets_are_seeded_disjoint_and_correct():
    train, held = arithmetic_sets(60, 20, seed=1)
    assert (train, held) == arithmetic_sets(60, 20, seed=1)
    questions = [r["prompt"][0]["content"] for r in train]
    assert not set(questions) & {r["prompt"][0]["content"] for r in held}
    for record in train[:len(PROBLEMS)] + held[:len(PROBLEMS)]:
        question = record["prompt"][0]["content"].removesuffix(INSTRUCTION)
        a, b, c = (int(x) for x in re.findall(r"\d+", question))
        assert int(record["answer"]) > 0 and int(record["answer"]) in (a * b - c, a * b + c) and 100 <= c <= 999


def test_one_step_arithmetic_sets_ask_for_the_product():
    train, held = arithmetic_sets(24, 16, seed=2, steps=1)
    assert (train, held) == arithmetic_sets(24, 16, seed=2, steps=1)
    assert not {r["prompt"][0]["content"] for r in train} & {r["prompt"][0]["content"] for r in held}
    for record in train[:len(ONE_STEP)] + held[:len(ONE_STEP)]:
        question = record["prompt"][0]["content"]
        assert question.endswith(INSTRUCTION)
        a, b = (int(x) for x in re.findall(r"\d+", question.removesuffix(INSTRUCTION)))
        assert int(record["answer"]) == a * b and 12 <= min(a, b) and max(a, b) <= 99
    with pytest.raises(ValueError, match="steps must be 1 or 2"):
        arithmetic_sets(4, 4, steps=3)


@pytest.mark.parametrize("spec", ["alignkit.envs.self_correction:SelfCorrection",
                                  "alignkit.envs.arithmetic:ArithmeticTools"])
def test_the_shipped_environments_load_by_name(spec):
    env = load_environment(spec).make({})
    assert type(env).__name__ == spec.split(":")[1]
