"""`alignkit rl`'s plumbing on the tiny model: it trains through `alignkit online`, answers the shipped held-out
prompts before and after, and writes a summary whose compliance figures recompute from the answers it saved, the
report with its curves and per-type chart, and refuses malformed constraints before it trains."""

from __future__ import annotations

import json

import pytest

from alignkit.errors import DataError
from alignkit.recipes.rl import run_rl
from alignkit.rewards.verifiable.constraints import check_all

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
    rounds = [json.loads(line) for line in (tmp_path / "online" / "metrics.jsonl").read_text().splitlines()]
    assert len(rounds) == 2 and all("entropy" in r for r in rounds)


def test_rl_recipe_refuses_malformed_constraints_before_training(task, tmp_path):
    bad = tmp_path / "train.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "constraints": [{"type": "max_words", "n": "ten"}]}) + "\n")
    with pytest.raises(DataError, match="constraints") as err:
        run_rl(overrides=tiny(task, tmp_path / "out", train_prompts=str(bad)))
    assert err.value.row == 1
    assert not (tmp_path / "out").exists()  # nothing written
