"""Verifiable rewards: every constraint checker on hand-written passing and failing texts, named errors for malformed
`constraints` and `answer` fields, the math final-answer checker, and the seeded constraint prompt sets."""

from __future__ import annotations

import json

import pytest

from alignkit.data.load import load_records
from alignkit.errors import DataError
from alignkit.rewards.spec import load_reward
from alignkit.rewards.verifiable import (
    CHECKERS,
    ConstraintReward,
    ExactMatch,
    MathAnswer,
    extract_answer,
    same_answer,
)
from alignkit.rewards.verifiable.constraints import check, validate_constraints
from alignkit.rewards.verifiable.prompts import ARGUMENTS, TOPICS, combinations, prompt_sets

# type -> (arguments, texts that meet it, texts that do not)
CASES = {
    "max_words": ({"n": 5}, ["One two three four five.", "Short."], ["one two three four five six", ""]),
    "min_words": ({"n": 4}, ["It's a fine day today.", "a b c d e"], ["Too short here.", ""]),
    "max_sentences": ({"n": 2}, ["One. Two!", "No end mark at all"], ["One. Two. Three?", ""]),
    "min_sentences": ({"n": 3}, ["A. B? C!", "I ran. You ran. We ran"], ["One. Two.", "3.5 is a number."]),
    "lowercase": ({}, ["all small, 3 words."], ["Not all small.", "123 456"]),
    "uppercase": ({}, ["ALL CAPS, 2 WORDS!"], ["ALL CAPS bUT ONE", "!!!"]),
    "max_capital_words": ({"n": 1}, ["Only ONE shout here.", "none at all"], ["TWO LOUD words"]),
    "include": ({"words": ["river", "Bridge"]}, ["The river runs under the bridge."],
                ["The rivers run under the bridge.", "A river."]),
    "exclude": ({"words": ["very"]}, ["It is quite nice; everything is fine."], ["It is Very nice.", "very"]),
    "no_commas": ({}, ["No commas here."], ["Yes, there is one."]),
    "starts_with": ({"phrase": "In short"}, ["  in short, yes.", "In short"], ["Yes. In short, yes."]),
    "ends_with": ({"phrase": "That is all."}, ["Done. that is all.  "], ["That is all. Done.", "That is all"]),
    "bullets": ({"n": 2}, ["Intro\n* one\n- two", "* a\n*  b\n"], ["* one\n* two\n* three", "*no space\n* one",
                                                                    "one - two - three"]),
    "paragraphs": ({"n": 2}, ["First part.\n\nSecond part.", "a\n  \nb\n"], ["One.\nStill one.", "a\n\nb\n\nc"]),
    "quoted": ({}, ['"The whole thing."', '  "x y"  '], ['"Half" quoted', '"', "plain"]),
    "title": ({}, ["<<A Title>>\nText.", "Text <<t>>"], ["<<>> empty", "<A Title>", "<<line\nbreak>>"]),
    "json": ({}, ['{"a": 1}', '```json\n[1, 2]\n```', "3"], ["{'a': 1}", "not json", ""]),
    "placeholders": ({"n": 2}, ["Dear [name], at [address]."], ["Dear [name].", "Dear [].", "[a\nb] [c]"]),
}


def test_every_checker_has_cases():
    assert set(CASES) == set(CHECKERS)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_checker_on_passing_and_failing_texts(kind):
    args, passing, failing = CASES[kind]
    spec = validate_constraints([{"type": kind, **args}])[0]
    for text in passing:
        assert check(spec, text), (kind, text)
    for text in failing:
        assert not check(spec, text), (kind, text)


def test_reward_is_the_fraction_met_with_an_optional_bonus():
    record = {"prompt": "p", "constraints": [{"type": "no_commas"}, {"type": "max_words", "n": 3},
                                             {"type": "include", "words": ["sun"]}]}
    plain = ConstraintReward().bind([record])
    bonus = ConstraintReward(all_met_bonus=1.0).bind([record])
    texts = ["Sun, sun, sun.", "The sun shines.", "Hello there, world friend."]
    assert plain(["p"] * 3, texts) == pytest.approx([2 / 3, 1.0, 0.0])
    assert bonus(["p"] * 3, texts) == pytest.approx([2 / 3, 2.0, 0.0])
    with pytest.raises(KeyError, match="bind its records"):
        plain(["another prompt"], ["x"])
    assert load_reward("constraints+bonus").all_met_bonus == 1.0


@pytest.mark.parametrize("value,message", [
    ([{"type": "max_wordz", "n": 3}], "constraint 1: unknown type 'max_wordz'"),
    ([{"type": "no_commas"}, {"type": "max_words"}], r"constraint 2 \(max_words\): missing argument\(s\) n"),
    ([{"type": "max_words", "n": -1}], "'n' must be an integer >= 0"),
    ([{"type": "max_words", "n": True}], "'n' must be an integer >= 0"),
    ([{"type": "max_words", "n": 3, "m": 1}], r"unknown argument\(s\) m"),
    ([{"type": "include", "words": []}], "'words' must be a non-empty list"),
    ([{"type": "starts_with", "phrase": "  "}], "'phrase' must be a non-empty string"),
    ([], "non-empty list"),
    ("max_words", "non-empty list"),
    ([["max_words"]], "an object with a string 'type'"),
])
def test_malformed_constraints_are_named_errors(tmp_path, value, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "ok", "constraints": [{"type": "no_commas"}]}) + "\n"
                    + json.dumps({"prompt": "bad", "constraints": value}) + "\n")
    with pytest.raises(DataError, match=message) as err:
        ConstraintReward().bind(load_records(str(path), shape="prompts"))
    assert (err.value.file, err.value.row, err.value.field) == (str(path), 2, "constraints")


def test_a_missing_field_is_a_named_error(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "no answer here"}) + "\n")
    with pytest.raises(DataError) as err:
        MathAnswer().bind(load_records(str(path), shape="prompts"))
    assert (err.value.row, err.value.field) == (1, "answer")
    path.write_text(json.dumps({"prompt": "p", "answer": float("nan")}).replace("NaN", "NaN") + "\n")
    with pytest.raises(DataError, match="finite"):
        MathAnswer().bind(load_records(str(path), shape="prompts"))


@pytest.mark.parametrize("text,answer", [
    ("So the total is \\boxed{42}.", "42"),
    ("\\boxed{\\frac{1}{2}}", "0.5"),
    ("We get 3/4 in the end.", "0.75"),
    ("The answer is 1,234.", "1234"),
    ("The final answer is $12.50.", "12.5"),
    ("First 3, then 7, so 10", "10"),
    ("#### -4", "-4"),
    ("Answer: 0.3333333334", "1/3"),
    ("It is \\boxed{x + 1}", "x+1"),
])
def test_math_answers_that_match(text, answer):
    assert same_answer(extract_answer(text), answer, rel_tol=1e-6)
    assert MathAnswer().bind([{"prompt": "q", "answer": answer}])(["q"], [text]) == [1.0]


@pytest.mark.parametrize("text,answer", [
    ("The answer is 41.", "42"),
    ("\\boxed{2} but the answer is 3", "3"),  # the box wins
    ("no number here", "7"),
    ("The answer is 0.51", "1/2"),
])
def test_math_answers_that_do_not_match(text, answer):
    assert not same_answer(extract_answer(text), answer)
    assert MathAnswer(correct=1.0, wrong=-1.0).bind([{"prompt": "q", "answer": answer}])(["q"], [text]) == [-1.0]


def test_exact_match():
    reward = ExactMatch().bind([{"prompt": "q", "answer": "Paris"}])
    assert reward(["q", "q", "q"], [" paris\n", "Paris.", "Lyon"]) == [1.0, 0.0, 0.0]


def test_prompt_sets_hold_out_combinations_and_topics():
    types = ("max_words", "include", "starts_with", "ends_with", "no_commas", "title")
    train, held = prompt_sets(types, 60, 20, seed=3)
    assert (train, held) == prompt_sets(types, 60, 20, seed=3) and train != prompt_sets(types, 60, 20, seed=4)[0]
    combo = lambda r: tuple(sorted(c["type"] for c in r["constraints"]))  # noqa: E731
    assert {combo(r) for r in train}.isdisjoint({combo(r) for r in held})
    assert {t for r in train for t in combo(r)} == set(types)
    used = lambda rs: {t for r in rs for t in TOPICS if t in r["prompt"][0]["content"]}  # noqa: E731
    assert used(train).isdisjoint(used(held))
    for record in train + held:
        assert validate_constraints(record["constraints"]) == record["constraints"]
    assert all(len(c) == 2 for c in combinations(tuple(ARGUMENTS), 2))
    assert ("lowercase", "uppercase") not in combinations(tuple(ARGUMENTS), 2)


def test_shipped_rl_prompt_sets_are_the_generators(tmp_path):
    """`alignkit rl`'s shipped files are exactly what the seeded generator writes for the recipe's types."""
    from importlib import resources

    from alignkit.recipes.rl import PROMPT_SETS, TYPES
    from alignkit.rewards.verifiable.prompts import write_prompt_sets

    write_prompt_sets(tmp_path, TYPES, **PROMPT_SETS)
    for name in ("rl_train.jsonl", "rl_eval.jsonl"):
        assert (tmp_path / name).read_text() == (resources.files("alignkit") / "assets" / name).read_text()


def test_guards_zero_the_degenerate_answers():
    from alignkit.rewards.verifiable.constraints import repeated_share

    record = {"prompt": "p", "constraints": [{"type": "ends_with", "phrase": "That is all."}]}
    guarded = ConstraintReward(min_words=5, max_repeat=0.3).bind([record])
    plain = ConstraintReward().bind([record])
    texts = ["That is all.", "Rain fell on the quiet town. That is all.", "the end the end the end the end. That is all."]
    assert plain(["p"] * 3, texts) == [1.0, 1.0, 1.0]
    assert guarded(["p"] * 3, texts) == [0.0, 1.0, 0.0]
    assert repeated_share("a b a b a b") == pytest.approx(1 - 2 / 5)
    assert repeated_share("one two three") == 0.0 and repeated_share("") == 0.0


def test_bind_records_reaches_rewards_inside_a_weighted_sum():
    from alignkit.rewards.base import WeightedSum
    from alignkit.rewards.verifiable.records import bind_records

    records = [{"prompt": "p1", "constraints": [{"type": "no_commas"}]},
               {"prompt": "p2", "constraints": [{"type": "lowercase"}]}]
    inner, plain = ConstraintReward(), ConstraintReward()
    total = WeightedSum([(inner, 2.0), (plain, 1.0)])
    assert bind_records(total, records) is total
    assert total(["p1", "p2"], ["a, b", "all small"]) == [0.0, 3.0]  # both parts bound: 2 x met + 1 x met
    untouched = object()
    assert bind_records(untouched, records) is untouched  # a reward that reads no record fields
