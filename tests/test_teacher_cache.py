"""The teacher's top-k on disk for offline distillation (`teacher_cache:`, train/teacher_cache.py): training from the
cache equals training with the live teacher (losses and weights), a second run reads it without running the teacher,
and a cache built from other data, by another teacher or with another k is refused before anything is written."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from alignkit.config import TrainConfig
from alignkit.data.load import write_jsonl_atomic
from alignkit.data.synthetic import sft_records
from alignkit.errors import ConfigError
from alignkit.train.logging import read_metrics
from alignkit.train.loop import train
from synthetic_task import aligned_model

pytestmark = pytest.mark.usefixtures("one_thread")
TIMING = ("time/", "samples_per_s", "tokens_per_s")


@pytest.fixture(scope="module")
def setup(task, tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher_cache")
    for name, model in (("teacher", aligned_model()), ("other_teacher", task.model)):
        model.save_pretrained(root / name)
        task.tokenizer.save_pretrained(root / name)
    write_jsonl_atomic(root / "sft.jsonl", sft_records(24, seed=7))
    write_jsonl_atomic(root / "other.jsonl", sft_records(24, seed=9))
    return root


def config(root, out, **overrides) -> TrainConfig:
    values = dict(model="tiny", loss="gkd", train_data=str(root / "sft.jsonl"), teacher=str(root / "teacher"),
                  loss_options={"beta": 0.5, "top_k": 8}, max_length=64, max_tokens_per_batch=96,
                  max_tokens_per_row=96, seed=0, progress=False, learning_rate=2e-3, epochs=1, eval_fraction=0.2,
                  log_every=1, output_dir=str(out))
    return TrainConfig(**{**values, **overrides})


def run(task, cfg):
    result = train(cfg, copy.deepcopy(task.model), task.tokenizer)
    rows = [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in read_metrics(cfg.output_dir)]
    return rows, {k: v.detach().clone() for k, v in result.model.state_dict().items()}


def assert_same_run(a, b):
    rows_a, weights_a = a
    rows_b, weights_b = b
    assert len(rows_a) == len(rows_b) > 2
    for row_a, row_b in zip(rows_a, rows_b):
        assert row_a.keys() == row_b.keys()
        for key in row_a:
            assert row_b[key] == pytest.approx(row_a[key], rel=1e-5, abs=1e-6), key
    for name, value in weights_a.items():
        torch.testing.assert_close(weights_b[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_training_from_the_cache_equals_training_with_the_live_teacher(task, setup, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    live = run(task, config(setup, tmp_path / "live"))
    assert any("eval/distill/divergence" in row for row in live[0])
    built = run(task, config(setup, tmp_path / "built", teacher_cache=str(cache)))
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["top_k"] == 8 and {p.name for p in cache.iterdir()} == {"manifest.json", "train.safetensors",
                                                                           "eval.safetensors"}
    assert_same_run(live, built)

    from alignkit.train import teacher, teacher_cache

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher ran although its top-k is cached")

    monkeypatch.setattr(teacher, "teacher_hidden", no_teacher)  # the live path's teacher forward
    monkeypatch.setattr(teacher_cache, "teacher_hidden", no_teacher)  # the cache's build
    reused = run(task, config(setup, tmp_path / "reused", teacher_cache=str(cache)))
    assert_same_run(live, reused)


def test_dckd_reads_the_cache_too(task, setup, tmp_path):
    from alignkit.data.synthetic import preference_records

    write_jsonl_atomic(tmp_path / "pairs.jsonl", preference_records(12, seed=8))
    cfg = lambda out, **extra: config(setup, out, loss="dckd", train_data=str(tmp_path / "pairs.jsonl"),  # noqa: E731
                                      loss_options={"top_k": 4}, eval_fraction=0.0, **extra)
    assert_same_run(run(task, cfg(tmp_path / "live")), run(task, cfg(tmp_path / "cached",
                                                                     teacher_cache=str(tmp_path / "c"))))


def test_a_cache_of_other_data_teacher_or_k_is_refused(task, setup, tmp_path):
    cache = tmp_path / "cache"
    run(task, config(setup, tmp_path / "first", teacher_cache=str(cache), max_steps=1))
    before = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    cases = [
        ({"train_data": str(setup / "other.jsonl")}, r"built from other training data"),
        ({"eval_fraction": 0.25}, r"built from other (training|evaluation) data"),
        ({"teacher": str(setup / "other_teacher")}, r"built by another teacher \(its weights differ\)"),
        ({"loss_options": {"beta": 0.5, "top_k": 4}}, r"built with another top_k \(8, this run 4\)"),
        ({"loss_options": {"top_k": 8, "temperature": 0.7}}, r"built at another temperature"),
    ]
    for i, (overrides, message) in enumerate(cases):
        out = tmp_path / f"refused{i}"
        with pytest.raises(ConfigError, match=r"config key 'teacher_cache': .*" + message):
            train(config(setup, out, teacher_cache=str(cache), **overrides), copy.deepcopy(task.model),
                  task.tokenizer)
        assert not out.exists(), overrides
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == before  # nothing rewritten


def test_bad_teacher_cache_setups_are_refused(task, setup, tmp_path):
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "readme.txt").write_text("mine")
    cases = [
        ({"teacher_cache": str(foreign)}, r"is not a teacher cache \(it holds 'readme.txt'"),
        ({"teacher_cache": str(tmp_path / "c"), "loss_options": {"top_k": 0}}, r"set loss_options.top_k > 0"),
        ({"teacher_cache": str(tmp_path / "c"), "loss": "sft", "teacher": None,
          "loss_options": {}}, r"loss 'sft' has no teacher"),
    ]
    for i, (overrides, message) in enumerate(cases):
        out = tmp_path / f"refused{i}"
        with pytest.raises(ConfigError, match=r"config key 'teacher_cache': .*" + message):
            train(config(setup, out, **overrides), copy.deepcopy(task.model), task.tokenizer)
        assert not out.exists()
    assert not (tmp_path / "c").exists() and [p.name for p in foreign.iterdir()] == ["readme.txt"]
