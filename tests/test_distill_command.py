"""`alignkit distill` (recipes/distill.py, online/mixing.py) on the synthetic review task: the SFT'd tiny Llama taught
by a teacher tuned on positive answers. Each mode runs through the command; the rounds follow GKD's seeded draw
(student with probability lambda, else the teacher with seq_kd, else the dataset) and metrics.jsonl records it; a
dataset round trains on the records' completions exactly as `alignkit train --loss gkd` does on the same batch; a
crash resumes to the uninterrupted run; bad setups are refused in one line before anything is written."""

from __future__ import annotations

import json

import pytest

from alignkit.cli import main
from alignkit.data.load import write_jsonl_atomic
from alignkit.data.synthetic import sft_records
from alignkit.errors import ConfigError, DataError
from alignkit.online.mixing import round_source
from alignkit.recipes.distill import distill_config, online_config_of, run_distill
from alignkit.train.logging import read_metrics
from synthetic_task import aligned_model
from test_online_guarantees import crash_in_round, without_timing

pytestmark = pytest.mark.usefixtures("one_thread")
SOURCE_KEYS = ("student_sampled", "teacher_sampled", "dataset_completions")


@pytest.fixture(scope="module")
def setup(task, tmp_path_factory):
    root = tmp_path_factory.mktemp("distill_command")
    aligned_model().save_pretrained(root / "teacher")
    task.tokenizer.save_pretrained(root / "teacher")
    write_jsonl_atomic(root / "sft.jsonl", sft_records(32, seed=7))
    write_jsonl_atomic(root / "batch.jsonl", sft_records(8, seed=9))
    return root


def values(task, root, out, **overrides) -> dict:
    base = dict(model=str(task.model_dir), teacher=str(root / "teacher"), train_data=str(root / "sft.jsonl"),
                output_dir=str(out), rounds=4, prompts_per_round=8, num_samples=4, max_new_tokens=10, max_length=64,
                max_tokens_per_batch=1024, max_tokens_per_row=512, learning_rate=1e-3, eval_before_after=False,
                progress=False)
    return {key: value for key, value in {**base, **overrides}.items() if value is not None}


def cli(**keys) -> int:
    return main(["distill", *(part for key, value in keys.items() for part in (f"--{key}", str(value)))])


def seed_where(first: str, lmbda: float) -> int:
    """A seed whose first round GKD's draw gives to `first` and whose first 4 rounds hold both sources."""
    for seed in range(200):
        sources = [round_source(seed, r, lmbda, False) for r in range(4)]
        if sources[0] == first and len(set(sources)) == 2:
            return seed
    raise AssertionError("no such seed")


def test_the_draw_follows_trls_rule():
    # TRL's GKDTrainer.training_step: student with probability lmbda, `elif seq_kd` the teacher, else the dataset
    assert {round_source(3, r, 1.0, seq_kd) for r in range(50) for seq_kd in (False, True)} == {"student"}
    assert {round_source(3, r, 0.0, True) for r in range(50)} == {"teacher"}
    assert {round_source(3, r, 0.0, False) for r in range(50)} == {"dataset"}
    draws = [round_source(3, r, 0.3, False) for r in range(400)]
    assert set(draws) == {"student", "dataset"} and 90 < draws.count("student") < 150
    assert draws == [round_source(3, r, 0.3, False) for r in range(400)]  # seeded by the round: a resume redraws them
    assert [round_source(3, r, 0.3, True) for r in range(400)] == [d.replace("dataset", "teacher") for d in draws]


@pytest.mark.parametrize("mode", ["on-policy gkd", "on-policy opd", "teacher samples", "dataset", "mixed"])
def test_each_mode_runs_through_the_command(task, setup, tmp_path, mode):
    keys = {"on-policy gkd": dict(lmbda=1.0, beta=1.0), "on-policy opd": dict(lmbda=1.0, loss="opd"),
            "teacher samples": dict(lmbda=0.0, seq_kd=True), "mixed": dict(lmbda=0.5, seed=seed_where("dataset", 0.5)),
            "dataset": dict(lmbda=0.0, rounds=None, prompts_per_round=None, num_samples=None, max_new_tokens=None,
                            eval_before_after=None, max_steps=4)}[mode]
    cfg = values(task, setup, tmp_path, **{"rounds": 3, **keys})
    assert cli(**cfg) == 0
    rows = [row for row in read_metrics(tmp_path) if "loss" in row]
    assert len(rows) == (3 if mode != "dataset" else 4)
    assert (tmp_path / "final" / "config.json").exists()
    assert all(("distill/reverse_kl" if mode == "on-policy opd" else "distill/divergence") in row for row in rows)
    if mode == "dataset":  # offline training: no rounds, nothing sampled
        assert not (tmp_path / "rollouts.jsonl").exists() and "round" not in rows[0]
        return
    sources = [round_source(cfg.get("seed", 0), r, cfg["lmbda"], cfg.get("seq_kd", False)) for r in range(3)]
    if cfg["lmbda"] == 1:
        assert not any(key in row for row in rows for key in SOURCE_KEYS)  # nothing to record: every round samples
    else:
        assert [next(k for k in SOURCE_KEYS if row[k] == 1) for row in rows] == [f"{s}_sampled" if s != "dataset"
                                                                                else "dataset_completions"
                                                                                for s in sources]
        assert all(sum(row[k] for k in SOURCE_KEYS) == 1 for row in rows)
    for row, source in zip(rows, sources):  # a dataset round generates nothing; its responses are one per prompt
        assert (row["generated_tokens"] == 0) == (source == "dataset")
        assert row["examples"] == 8


def test_dataset_rounds_train_on_the_records_completions_as_offline_gkd(task, setup, tmp_path):
    """The mixed run's first round is a dataset round over all 8 records of batch.jsonl: its loss (one step, before
    any update) equals `alignkit train --loss gkd` on the same records in one step."""
    common = dict(train_data=str(setup / "batch.jsonl"), beta=0.5)
    seed = seed_where("dataset", 0.5)
    online = run_distill(values(task, setup, tmp_path / "mixed", rounds=1, lmbda=0.5, seed=seed, **common))
    row = online.rounds[0]
    assert row["dataset_completions"] == 1 and row["generated_tokens"] == 0 and row["examples"] == 8
    offline_keys = dict(values(task, setup, tmp_path / "offline", **common), loss="gkd", max_steps=1, seed=seed)
    for key in ("rounds", "prompts_per_round", "num_samples", "max_new_tokens", "eval_before_after"):
        offline_keys.pop(key)
    assert main(["train", *(p for k, v in offline_keys.items() for p in (f"--{k}", str(v)))]) == 0
    step = next(r for r in read_metrics(tmp_path / "offline") if "loss" in r)
    print(f"dataset round loss {row['loss']:.6f}, train --loss gkd {step['loss']:.6f}")
    assert row["loss"] == pytest.approx(step["loss"], abs=1e-5, rel=0)
    assert row["distill/divergence"] == pytest.approx(step["distill/divergence"], abs=1e-5, rel=0)
    # the texts trained on are the records' completions, in the round's order
    completions = {json.loads(line)["completion"].strip() for line in (setup / "batch.jsonl").read_text().splitlines()}
    trained = json.loads((tmp_path / "mixed" / "rollouts.jsonl").read_text().splitlines()[0])["texts"]
    assert sorted(t.strip() for [t] in trained) == sorted(completions)


def test_a_mixed_run_resumes_to_the_uninterrupted_run(task, setup, tmp_path):
    keys = dict(rounds=4, lmbda=0.5, seed=seed_where("student", 0.5), save_every=1, keep_last=5)
    run_distill(values(task, setup, tmp_path / "straight", **keys))
    crash_in_round(3, lambda: run_distill(values(task, setup, tmp_path / "crashed", **keys)))
    resumed = run_distill(values(task, setup, tmp_path / "crashed", **keys))
    assert [r["round"] for r in resumed.rounds] == [3, 4]
    straight = without_timing(read_metrics(tmp_path / "straight"))
    assert {row["dataset_completions"] for row in straight if "round" in row} == {0.0, 1.0}
    assert without_timing(read_metrics(tmp_path / "crashed")) == straight


def test_sampled_rounds_take_the_online_runs_async_and_ray_keys(task, setup, tmp_path):
    """`alignkit distill --async.max_staleness 1 --ray.rollout_workers 2` reach the online run as `alignkit online`
    reads them (the Ray learner group runs it: tests/test_online_ray.py)."""
    keys = values(task, setup, tmp_path, lmbda=1.0, **{"async": {"max_staleness": 1}, "ray": {"rollout_workers": 2}})
    online = online_config_of(distill_config(None, keys))
    assert online.async_rollouts.max_staleness == 1 and online.ray.rollout_workers == 2
    assert online_config_of(distill_config(None, values(task, setup, tmp_path, lmbda=1.0))).ray is None


def test_bad_setups_are_refused_before_anything_is_written(task, setup, tmp_path):
    rows = sft_records(4, seed=3)
    write_jsonl_atomic(tmp_path / "no_completion.jsonl", [*rows[:2], {"prompt": rows[2]["prompt"]}, rows[3]])
    write_jsonl_atomic(tmp_path / "number.jsonl", [rows[0], {"prompt": rows[1]["prompt"], "completion": 5}])
    cases = [
        (dict(loss="opd", lmbda=0.5), ConfigError, r"'lmbda': opd scores the student's own samples"),
        (dict(loss="uld", lmbda=0.5), ConfigError, r"'loss': uld runs on the student's samples \(lmbda 1\) or on the dataset's"),
        (dict(train_data=None, prompts=str(setup / "sft.jsonl")), ConfigError, r"'train_data': lmbda < 1 without"),
        (dict(prompts=str(setup / "sft.jsonl")), ConfigError, r"'prompts': rounds that read completions take"),
        (dict(epochs=2), ConfigError, r"'epochs': read by offline training \(lmbda 0 without seq_kd\) only"),
        (dict(lmbda=0.0), ConfigError, r"'rounds': read by sampled rounds"),
        (dict(lmbda=0.0, rounds=None, prompts_per_round=None, num_samples=None, eval_before_after=None,
              max_new_tokens=None,
              ray={"rollout_workers": 1}), ConfigError, r"'ray': read by sampled rounds"),
        (dict(lmbda=1.0, **{"async": {"max_staleness": -1}}), ConfigError, r"async"),
        (dict(lmbda=1.0, train_data=None), ConfigError, r"'prompts': the rounds sample from prompt records"),
        (dict(teacher=None), ConfigError, r"'teacher'"),
        (dict(lmbda=2.0), ConfigError, r"'lmbda'"),
        (dict(train_data=str(tmp_path / "no_completion.jsonl")), DataError,
         r"no_completion.jsonl, row 3, field 'completion': .*; fix the record: rounds that are not sampled"),
        (dict(train_data=str(tmp_path / "number.jsonl")), DataError, r"number.jsonl, row 2, field 'completion'"),
        (dict(train_data=str(tmp_path / "missing.jsonl")), DataError, r"missing.jsonl"),
    ]
    for i, (keys, error, message) in enumerate(cases):
        out = tmp_path / f"run{i}"
        with pytest.raises(error, match=message):
            run_distill(values(task, setup, out, **{"lmbda": 0.5, **keys}))
        assert not out.exists(), keys
