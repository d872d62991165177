"""The teacher's top-k on disk inside a mixed GKD run (`alignkit distill --lmbda 0.5 --teacher_cache DIR`): the
dataset rounds read the cached top-k of the records' completions instead of running the teacher (the student's
rounds still run it); a run that builds the cache and a run that reads it equal the run with the live teacher; a
cache of other data or another k, and a cache where no round reads completions, are refused before anything is
written."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from alignkit.data.load import write_jsonl_atomic
from alignkit.data.synthetic import sft_records
from alignkit.errors import ConfigError
from alignkit.online import run as online_run
from alignkit.online.mixing import round_source
from alignkit.recipes.distill import run_distill
from alignkit.train import teacher as live_teacher
from alignkit.train import teacher_cache
from alignkit.train.logging import read_metrics
from synthetic_task import aligned_model

pytestmark = pytest.mark.usefixtures("one_thread")
TIMING = ("time/", "samples_per_s", "tokens_per_s")
SEED = next(s for s in range(100) if {round_source(s, r, 0.5, False) for r in range(3)} == {"student", "dataset"})


@pytest.fixture(scope="module")
def setup(task, tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher_cache_mixed")
    aligned_model().save_pretrained(root / "teacher")
    task.tokenizer.save_pretrained(root / "teacher")
    write_jsonl_atomic(root / "sft.jsonl", sft_records(16, seed=7))
    write_jsonl_atomic(root / "other.jsonl", sft_records(16, seed=9))
    return root


def values(task, root, out, **overrides) -> dict:
    base = dict(model=str(task.model_dir), teacher=str(root / "teacher"), train_data=str(root / "sft.jsonl"),
                output_dir=str(out), lmbda=0.5, seed=SEED, beta=0.5, top_k=4, rounds=3, prompts_per_round=8,
                num_samples=2, max_new_tokens=8, max_length=64, max_tokens_per_batch=160, max_tokens_per_row=160,
                learning_rate=2e-3, eval_before_after=False, progress=False)
    return {key: value for key, value in {**base, **overrides}.items() if value is not None}


def run_spied(task, root, out, monkeypatch, **overrides) -> list[str]:
    """The run, and the source (student / dataset) of the round of every teacher forward it made."""
    current, seen = [None], []
    real_learn, real_hidden = online_run.OnlineRun.learn, live_teacher.teacher_hidden

    def learn(self, experience, round_index):
        current[0] = self.source(round_index)
        return real_learn(self, experience, round_index)

    def hidden(*args, **kwargs):
        seen.append(current[0])
        return real_hidden(*args, **kwargs)

    monkeypatch.setattr(online_run.OnlineRun, "learn", learn)
    monkeypatch.setattr(live_teacher, "teacher_hidden", hidden)
    run_distill(overrides=values(task, root, out, **overrides))
    monkeypatch.undo()
    return seen


def assert_same_run(ours, theirs) -> None:
    """Every logged number (throughput aside) to 1e-5, and the final weights."""
    a_rows, b_rows = read_metrics(ours), read_metrics(theirs)
    assert len(a_rows) == len(b_rows) == 3
    for a, b in zip(a_rows, b_rows):
        assert sorted(a) == sorted(b)
        for key, value in b.items():
            if not key.startswith(TIMING) and isinstance(value, (int, float)):
                assert a[key] == pytest.approx(value, rel=1e-5, abs=1e-5), (a["round"], key)
    final, expected = (load_file(d / "final" / "model.safetensors") for d in (ours, theirs))
    for key in expected:
        torch.testing.assert_close(final[key], expected[key], rtol=0, atol=1e-5, msg=key)


def test_the_dataset_rounds_read_the_cache_and_equal_the_live_teacher(task, setup, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    live = run_spied(task, setup, tmp_path / "live", monkeypatch)
    assert set(live) == {"student", "dataset"}  # without a cache the teacher runs in both kinds of round
    built = run_spied(task, setup, tmp_path / "built", monkeypatch, teacher_cache=str(cache))
    assert set(built) == {"student"} and len(built) == live.count("student")
    assert sorted(p.name for p in cache.iterdir()) == ["manifest.json", "train.safetensors"]
    assert len(load_file(cache / "train.safetensors")["token_counts"]) == 16  # every record's completion

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cache was scored again")

    monkeypatch.setattr(teacher_cache, "score_topk", no_rebuild)
    read = run_spied(task, setup, tmp_path / "read", monkeypatch, teacher_cache=str(cache))
    assert set(read) == {"student"}
    rows = read_metrics(tmp_path / "read")
    assert {row["dataset_completions"] for row in rows} == {0.0, 1.0}
    assert_same_run(tmp_path / "built", tmp_path / "live")
    assert_same_run(tmp_path / "read", tmp_path / "live")


def test_a_cache_of_other_records_or_another_k_is_refused(task, setup, tmp_path):
    cache = tmp_path / "cache"
    run_distill(overrides=values(task, setup, tmp_path / "first", teacher_cache=str(cache), rounds=1))
    before = {p.name: p.read_bytes() for p in cache.iterdir()}
    cases = [({"train_data": str(setup / "other.jsonl")}, "was built from other training data"),
             ({"top_k": 8}, r"was built with another top_k \(4, this run 8\)")]
    for i, (overrides, message) in enumerate(cases):
        out = tmp_path / f"refused{i}"
        with pytest.raises(ConfigError, match=rf"'teacher_cache': {cache} {message}"):
            run_distill(overrides=values(task, setup, out, teacher_cache=str(cache), **overrides))
        assert not out.exists()
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == before


def test_a_cache_where_no_round_reads_completions_is_refused(task, setup, tmp_path):
    cases = [({"lmbda": 1.0, "train_data": None, "prompts": str(setup / "sft.jsonl")}, "no dataset rounds"),
             ({"seq_kd": True, "train_data": None, "prompts": str(setup / "sft.jsonl")}, "no dataset rounds"),
             ({"top_k": 0}, "set loss_options.top_k > 0")]
    for i, (overrides, message) in enumerate(cases):
        out = tmp_path / f"refused{i}"
        with pytest.raises(ConfigError, match=rf"'teacher_cache': .*{message}"):
            run_distill(overrides=values(task, setup, out, teacher_cache=str(tmp_path / "cache"), **overrides))
        assert not out.exists() and not (tmp_path / "cache").exists()
