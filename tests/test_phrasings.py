"""Held-out phrasings of the constraint instructions: at least three per checker, none sharing wording with the
training phrasing, each stating the spec's own arguments and bound; a phrasing changes the prompt's words only, never
its spec; the shipped held-out-phrasings set is what the generator writes, covers every type, and shares no topic,
combination or instruction wording with training."""

from __future__ import annotations

import json
import random
import re
from importlib import resources

import pytest

from alignkit.recipes.rl import PHRASING_SET, PROMPT_SETS, TYPES
from alignkit.rewards.verifiable.constraints import (
    CHECKERS,
    HELD_OUT_PHRASINGS,
    TRAINING_PHRASINGS,
    check_all,
    describe,
    describe_training,
    n_phrasings,
    n_training_wordings,
    validate_constraints,
    words,
)
from alignkit.rewards.verifiable.prompts import (
    ARGUMENTS,
    TOPICS,
    make_record,
    phrasing_set,
    write_phrasing_set,
)

# Specs each phrasing is checked on: the generator's arguments and a few it never draws.
EXTRA = {"count": [{"n": 1}, {"n": 7}], "words": [{"words": ["river", "silver lining"]}],
         "phrase": [{"phrase": "So"}]}
# How a count instruction states its bound; "under n" and "fewer than n" are strict, so no phrasing may use them.
BOUNDS = {"max": ("at most", "no more than", "not exceed", "or fewer", "not write more than", "limit"),
          "min": ("at least", "no fewer than", "or more", "or longer"),
          "exact": ("exactly", "no more and no fewer")}
BOUND_OF = {"max_words": "max", "max_sentences": "max", "max_capital_words": "max", "min_words": "min",
            "min_sentences": "min", "placeholders": "min", "bullets": "exact", "paragraphs": "exact"}
ANSWERS = ["In short, the river is bright.", "* one\n* two", "<<A title>>\nThe [name] went home. That is all.",
           '"all small here"', "ALL LOUD NOW.", '{"a": 1}', "First part.\n\nSecond part. Thank you.",
           "Well here is a long answer with many words but no commas at all and it ends. The end.", ""]


def specs_of(kind: str) -> list[dict]:
    extra = [s for k in CHECKERS[kind].args.values() for s in EXTRA[k]]
    return validate_constraints([{"type": kind, **a} for a in [*ARGUMENTS[kind], *extra]])


def masked_fourgrams(text: str, spec: dict) -> set[tuple[str, ...]]:
    """Word 4-grams of an instruction with its arguments set aside (they are the spec, not the wording)."""
    for value in [v for k, v in spec.items() if k != "type"]:
        for item in value if isinstance(value, list) else [value]:
            text = text.replace(f'"{item}"', " | ").replace(str(item), " | ")
    grams = set()
    for piece in text.split("|"):
        tokens = [w.lower() for w in words(piece)]
        grams |= set(zip(tokens, tokens[1:], tokens[2:], tokens[3:]))
    return grams


def test_every_checker_has_at_least_three_held_out_phrasings():
    assert set(HELD_OUT_PHRASINGS) == set(CHECKERS)
    assert all(n_phrasings(kind) >= 4 for kind in CHECKERS)  # the training phrasing and three others


@pytest.mark.parametrize("kind", sorted(CHECKERS))
def test_held_out_phrasings_share_no_wording_with_training(kind):
    for spec in specs_of(kind):
        training = describe(spec)
        assert training == CHECKERS[kind].describe(**{k: v for k, v in spec.items() if k != "type"})
        held = [describe(spec, k) for k in range(1, n_phrasings(kind))]
        assert len(set(held)) == len(held) and training not in held
        for text in held:
            shared = masked_fourgrams(text, spec) & masked_fourgrams(training, spec)
            assert not shared, (text, training, shared)


@pytest.mark.parametrize("kind", sorted(CHECKERS))
def test_training_phrasings_share_no_wording_with_the_held_out_ones(kind):
    """The extra training wordings (prompts.vary_training) keep the held-out phrasings held out: no word 4-gram of
    any held-out phrasing occurs in any training wording."""
    assert set(TRAINING_PHRASINGS) == set(CHECKERS) and n_training_wordings(kind) >= 3
    for spec in specs_of(kind):
        training = [describe_training(spec, k) for k in range(n_training_wordings(kind))]
        assert training[0] == describe(spec) and len(set(training)) == len(training)
        for text in training:
            for held in (describe(spec, k) for k in range(1, n_phrasings(kind))):
                shared = masked_fourgrams(text, spec) & masked_fourgrams(held, spec)
                assert not shared, (text, held, shared)


def every_wording(spec: dict) -> list[str]:
    kind = spec["type"]
    return [describe(spec, k) for k in range(n_phrasings(kind))] + [
        describe_training(spec, k) for k in range(1, n_training_wordings(kind))]


@pytest.mark.parametrize("kind", sorted(CHECKERS))
def test_every_phrasing_states_the_specs_arguments_and_bound(kind):
    for spec in specs_of(kind):
        for text in every_wording(spec):
            for item in spec.get("words", []) + ([spec["phrase"]] if "phrase" in spec else []):
                assert f'"{item}"' in text, (text, item)
            if "n" in spec and (spec["n"] or kind != "max_capital_words"):
                assert re.findall(r"\d+", text) == [str(spec["n"])], text
            if kind in BOUND_OF and (spec["n"] or kind != "max_capital_words"):
                stated = {b for b, cues in BOUNDS.items() if any(c in text.lower() for c in cues)}
                assert stated == {BOUND_OF[kind]}, (text, stated)


@pytest.mark.parametrize("kind", sorted(CHECKERS))
def test_a_phrasing_changes_the_wording_not_the_spec(kind):
    """The same draw in the training and in a held-out wording: the same spec, so the checker's verdicts agree on
    every answer; only the instructions' text differs."""
    for seed in range(6):
        other = [t for t in CHECKERS if t != kind][seed % (len(CHECKERS) - 1)]
        combo = (kind, other)
        canonical = make_record(random.Random(seed), "kites", combo)
        rephrased = make_record(random.Random(seed), "kites", combo, held_out_phrasing=True)
        assert rephrased["constraints"] == canonical["constraints"]
        for answer in ANSWERS:
            assert check_all(rephrased["constraints"], answer) == check_all(canonical["constraints"], answer)
        text = rephrased["prompt"][0]["content"]
        assert text != canonical["prompt"][0]["content"]
        for spec in rephrased["constraints"]:
            assert describe(spec) not in text
            assert any(describe(spec, k) in text for k in range(1, n_phrasings(spec["type"])))


def _shipped(name: str) -> list[dict]:
    return [json.loads(line) for line in (resources.files("alignkit") / "assets" / name).read_text().splitlines()]


def test_shipped_phrasing_set_is_the_generators(tmp_path):
    write_phrasing_set(tmp_path, TYPES, **PHRASING_SET)
    shipped = resources.files("alignkit") / "assets" / "rl_eval_phrasings.jsonl"
    assert (tmp_path / "rl_eval_phrasings.jsonl").read_text() == shipped.read_text()
    assert PHRASING_SET["seed"] == PROMPT_SETS["seed"]  # the split it holds out from is the shipped training set's


def test_shipped_phrasing_set_is_held_out_in_topic_combination_and_wording():
    train, held, phrased = (_shipped(n) for n in ("rl_train.jsonl", "rl_eval.jsonl", "rl_eval_phrasings.jsonl"))
    assert len(phrased) == PHRASING_SET["n"]
    combo = lambda r: tuple(sorted(c["type"] for c in r["constraints"]))  # noqa: E731
    topics = lambda rs: {t for r in rs for t in TOPICS if t in r["prompt"][0]["content"]}  # noqa: E731
    assert {t for r in phrased for t in combo(r)} == set(CHECKERS)
    assert {combo(r) for r in phrased}.isdisjoint({combo(r) for r in train})
    assert topics(phrased) and topics(phrased).isdisjoint(topics(train))
    training_wordings = {describe_training(s, k) for r in train + held for s in r["constraints"]
                         for k in range(n_training_wordings(s["type"]))}
    for record in phrased:
        text = record["prompt"][0]["content"]
        assert validate_constraints(record["constraints"]) == record["constraints"]
        assert not any(w in text for w in training_wordings), text
        for spec in record["constraints"]:
            assert any(describe(spec, k) in text for k in range(1, n_phrasings(spec["type"]))), text
            assert not any(describe_training(spec, k) in text for k in range(n_training_wordings(spec["type"])))


def test_phrasing_set_refuses_unknown_types():
    with pytest.raises(ValueError, match="unknown constraint types"):
        phrasing_set(TYPES, 4, types=("max_words", "haiku"))
