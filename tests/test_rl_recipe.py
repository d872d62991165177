"""`alignkit rl`'s plumbing on the tiny model: it trains through `alignkit online`, answers the shipped held-out
prompts and the held-out-phrasings prompts before and after, and writes a summary whose compliance figures and
flagged shares recompute from the answers it saved, with a fluency NLL, the report with its curves, per-type chart
and flag tables, and refuses malformed constraints before it trains."""

from __future__ import annotations

import json
import math

import pytest

from alignkit.errors import DataError
from alignkit.recipes.rl import TYPES, answer_flags, compliance, constraint_types, degeneracy, run_rl
from alignkit.recipes.rl_report import flagged_examples
from alignkit.rewards.verifiable.constraints import CHECKERS, check_all
from alignkit.rewards.verifiable.degenerate import FLAGS, flagged

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(task, out, **overrides):
    return {"model": str(task.model_dir), "output_dir": str(out), "rounds": 2, "prompts_per_round": 4,
            "num_samples": 2, "sampling": {"max_new_tokens": 6, "batch_size": 32},
            "eval_sampling": {"max_new_tokens": 6, "batch_size": 96}, "eval_samples": 1, "kl_answers": 4,
            "precision": "fp32", **overrides}


def test_rl_recipe_writes_a_summary_that_recomputes_from_its_answers(task, tmp_path):
    summary = run_rl(overrides=tiny(task, tmp_path))
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 96
    for side in ("original", "trained"):
        met = [all(check_all(a["constraints"], t)) for a in answers for t in a[side]]
        key = "all_met_before" if side == "original" else "all_met_after"
        assert summary[key][0] == pytest.approx(sum(met) / len(met))
        assert summary[key][1] <= summary[key][0] <= summary[key][2]
    assert set(summary["by_type"]) <= set(summary["types"])
    assert summary["kl_to_start"] == summary["kl_to_start"] and summary["samples"] == 2 * 4 * 2
    html = (tmp_path / "report.html").read_text()
    assert "Per constraint type" in html and html.count("<img") == 2
    assert "Degeneracy flags" in html and "Flagged answers" in html and "fluency" in html
    rounds = [json.loads(line) for line in (tmp_path / "online" / "metrics.jsonl").read_text().splitlines()]
    assert len(rounds) == 2 and all("entropy" in r for r in rounds)
    check_flags_and_fluency(summary, answers)
    check_phrasings(summary["phrasings"], tmp_path)
    assert "Held-out phrasings" in html and "Per constraint type (held-out phrasings)" in html


def check_phrasings(part: dict, out) -> None:
    """The held-out-phrasings figures recompute from answers_phrasings.jsonl: all-met, fraction met (with their
    intervals and paired change), per type over every checker, and the flagged shares."""
    answers = [json.loads(line) for line in (out / "answers_phrasings.jsonl").read_text().splitlines()]
    assert len(answers) == part["prompts"] == 96 and part["answers"] == 96
    assert set(part["by_type"]) == set(CHECKERS)
    per_answer = {}
    for side, when in (("original", "before"), ("trained", "after")):
        met = [check_all(a["constraints"], t) for a in answers for t in a[side]]
        per_answer[when] = [float(all(m)) for m in met], [sum(m) / len(m) for m in met]
        assert part[f"all_met_{when}"][0] == pytest.approx(sum(per_answer[when][0]) / len(met))
        assert part[f"fraction_{when}"][0] == pytest.approx(sum(per_answer[when][1]) / len(met))
        for key in ("all_met", "fraction"):
            assert part[f"{key}_{when}"][1] <= part[f"{key}_{when}"][0] <= part[f"{key}_{when}"][2]
        kind = sorted(CHECKERS)[0]
        hits = [ok for a in answers for t in a[side]
                for spec, ok in zip(a["constraints"], check_all(a["constraints"], t)) if spec["type"] == kind]
        assert part["by_type"][kind][0 if when == "before" else 1] == pytest.approx(sum(hits) / len(hits))
        flags = [flagged(t, a["constraints"], a["prompt"]) for a in answers for t in a[side]]
        assert flags == [f for a in answers for f in a[f"{side}_flags"]]
        assert part["flagged"]["any"][0 if when == "before" else 1] == pytest.approx(sum(map(bool, flags)) / len(flags))
        # the ceiling: the shipped training file's types (rl.TYPES) counted as met
        ceiling = [all(ok for spec, ok in zip(a["constraints"], check_all(a["constraints"], t))
                       if spec["type"] not in TYPES) for a in answers for t in a[side]]
        assert part[f"ceiling_{when}"][0] == pytest.approx(sum(ceiling) / len(ceiling))
        assert part[f"ceiling_{when}"][0] >= part[f"all_met_{when}"][0]
    change = [a - b for a, b in zip(per_answer["after"][0], per_answer["before"][0])]
    assert part["all_met_change"][0] == pytest.approx(sum(change) / len(change))


def check_flags_and_fluency(summary: dict, answers: list[dict]) -> None:
    """Flagged shares recompute from the per-answer flags answers.jsonl holds; the fluency NLLs are positive."""
    assert list(summary["flagged"]) == [*FLAGS, "any"]
    for i, side in enumerate(("original", "trained")):
        hits = [flagged(t, a["constraints"], a["prompt"]) for a in answers for t in a[side]]
        assert hits == [f for a in answers for f in a[f"{side}_flags"]]
        assert summary["flagged"]["any"][i] == pytest.approx(sum(map(bool, hits)) / len(hits))
        for name in FLAGS:
            assert 0 <= summary["flagged"][name][i] <= summary["flagged"]["any"][i] <= 1
    change = summary["flagged_any_change"]
    assert change[0] == pytest.approx(summary["flagged"]["any"][1] - summary["flagged"]["any"][0])
    assert change[1] <= change[0] <= change[2]
    for key in ("fluency_nll_before", "fluency_nll_after"):
        assert math.isfinite(summary[key]) and summary[key] > 0


def test_the_ceiling_counts_only_the_types_training_never_rewarded():
    """Answers to "at most 5 words, all lowercase" with max_words trained and lowercase not: the ceiling is the
    share meeting lowercase (max_words counted as met), all-met the share meeting both."""
    record = {"prompt": "p", "constraints": [{"type": "max_words", "n": 5}, {"type": "lowercase"}]}
    texts = [["all good here", "this one is lowercase but far too long", "Short But Upper", "Long And Upper Words Here Too"]]
    figures = compliance([record], texts, frozenset({"max_words"}))
    assert figures["all_met"] == [1.0, 0.0, 0.0, 0.0] and figures["ceiling"] == [1.0, 1.0, 0.0, 0.0]
    assert compliance([record], texts, frozenset({"max_words", "lowercase"}))["ceiling"] == [1.0] * 4
    assert "ceiling" not in compliance([record], texts)
    assert constraint_types([record, {"constraints": [{"type": "title"}]}]) == {"max_words", "lowercase", "title"}


def test_flagged_shares_and_examples_on_hand_written_answers():
    records = [{"prompt": [{"role": "user", "content": 'Tell me about the post office. Include the word "window".'}],
                "constraints": [{"type": "include", "words": ["window"]}]},
               {"prompt": [{"role": "user", "content": "Describe markets. Include at least 2 placeholders in square "
                                                       "brackets, like [name]."}],
                "constraints": [{"type": "placeholders", "n": 2}]}]
    before = [["The post office sells stamps and has a window for parcels."], ["Markets sell fruit at [stall] on [day]."]]
    after = [["window window window window window window"], ["In [name], [name] markets [name] are [name]."]]
    flags = answer_flags(records, before), answer_flags(records, after)
    assert flags[0] == [[[]], [[]]] and "keyword_stuffing" in flags[1][0][0] and "copied_example" in flags[1][1][0]
    summary = degeneracy(*flags)
    assert summary["flagged"]["any"] == [0.0, 1.0] and summary["flagged"]["empty_items"] == [0.0, 0.0]
    assert summary["flagged_any_change"][0] == 1.0
    rows = flagged_examples((records, before, after, *flags))
    assert [r[0] for r in rows] == ["model", "trained", "trained", "original"]
    assert rows[1][2] == after[0][0] and "keyword_stuffing" in rows[1][3] and rows[3][2] == "(none flagged)"


def test_rl_recipe_refuses_malformed_constraints_before_training(task, tmp_path):
    bad = tmp_path / "train.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "constraints": [{"type": "max_words", "n": "ten"}]}) + "\n")
    with pytest.raises(DataError, match="constraints") as err:
        run_rl(overrides=tiny(task, tmp_path / "out", train_prompts=str(bad)))
    assert err.value.row == 1
    assert not (tmp_path / "out").exists()  # nothing written
