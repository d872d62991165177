"""Offline distillation (`alignkit train --loss gkd|dckd|adpa --teacher DIR`) on the synthetic review task: the SFT'd
tiny Llama taught by a teacher tuned on positive answers (synthetic_task.aligned_model). GKD on dataset completions
(GKD's lambda = 0) and DCKD on pairs bring the divergence to the teacher down; ADPA raises the teacher's advantage
under the student; a crash resumes exactly; bad setups are refused before anything is written."""

from __future__ import annotations

import copy

import pytest

from alignkit.config import TrainConfig
from alignkit.data.load import write_jsonl_atomic
from alignkit.data.synthetic import preference_records, sft_records
from alignkit.errors import ConfigError
from alignkit.train.logging import read_metrics
from alignkit.train.loop import train
from synthetic_task import aligned_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(task, tmp_path_factory):
    root = tmp_path_factory.mktemp("distill_offline")
    # the teacher: tuned toward positive answers from the SFT model, which is its reference (ADPA's advantage)
    for name, model in (("teacher", aligned_model()), ("reference", task.model)):
        model.save_pretrained(root / name)
        task.tokenizer.save_pretrained(root / name)
    write_jsonl_atomic(root / "sft.jsonl", sft_records(48, seed=7))
    write_jsonl_atomic(root / "pairs.jsonl", preference_records(48, seed=8))
    return root


def config(root, out, loss, data, **overrides) -> TrainConfig:
    values = dict(model="tiny", loss=loss, train_data=str(root / data), teacher=str(root / "teacher"),
                  max_length=64, max_tokens_per_batch=512, max_tokens_per_row=256, seed=0, progress=False,
                  learning_rate=2e-3, epochs=2, log_every=1, output_dir=str(out))
    return TrainConfig(**{**values, **overrides})


def first_and_last(out, key):
    rows = [row for row in read_metrics(out) if key in row]
    return sum(r[key] for r in rows[:2]) / 2, sum(r[key] for r in rows[-2:]) / 2


@pytest.mark.parametrize("loss,data,options,key", [
    ("gkd", "sft.jsonl", {"beta": 0.5}, "distill/divergence"),
    ("dckd", "pairs.jsonl", {}, "distill/rejected_kl"),
])
def test_offline_distillation_lowers_the_divergence_to_the_teacher(task, setup, tmp_path, loss, data, options, key):
    train(config(setup, tmp_path, loss, data, loss_options=options), copy.deepcopy(task.model), task.tokenizer)
    start, end = first_and_last(tmp_path, key)
    print(f"{loss}: {key} {start:.4f} -> {end:.4f}")
    assert end < 0.7 * start


def test_adpa_raises_the_teachers_advantage_under_the_student(task, setup, tmp_path):
    cfg = config(setup, tmp_path, "adpa", "pairs.jsonl", teacher_reference=str(setup / "reference"))
    train(cfg, copy.deepcopy(task.model), task.tokenizer)
    start, end = first_and_last(tmp_path, "distill/advantage")
    print(f"adpa: advantage {start:.4f} -> {end:.4f}")
    assert end > start


def test_a_gkd_crash_resumes_exactly(task, setup, tmp_path, monkeypatch):
    from alignkit.train import loop

    cfg = lambda out: config(setup, out, "gkd", "sft.jsonl", save_every=1, keep_last=10)  # noqa: E731
    train(cfg(tmp_path / "straight"), copy.deepcopy(task.model), task.tokenizer)
    real, calls = loop.OfflineTraining.step, [0]

    def crashing(self, step):
        calls[0] += 1
        if calls[0] == 4:
            raise KeyboardInterrupt
        return real(self, step)

    monkeypatch.setattr(loop.OfflineTraining, "step", crashing)
    with pytest.raises(KeyboardInterrupt):
        train(cfg(tmp_path / "crashed"), copy.deepcopy(task.model), task.tokenizer)
    monkeypatch.setattr(loop.OfflineTraining, "step", real)
    train(cfg(tmp_path / "crashed"), copy.deepcopy(task.model), task.tokenizer)
    timing = ("time/", "samples_per_s", "tokens_per_s")
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith(timing)} for r in rows]  # noqa: E731
    assert strip(read_metrics(tmp_path / "crashed")) == strip(read_metrics(tmp_path / "straight"))


def test_bad_offline_setups_are_refused_before_anything_is_written(task, setup, tmp_path):
    cases = [
        ("gkd", "sft.jsonl", {"teacher": None}, r"'teacher': loss 'gkd' needs a teacher"),
        ("dpo", "pairs.jsonl", {}, r"'teacher': loss 'dpo' reads no teacher; leave it unset"),
        ("adpa", "pairs.jsonl", {}, r"'teacher_reference': loss 'adpa' needs a teacher_reference"),
        ("gkd", "sft.jsonl", {"teacher": str(tmp_path / "nowhere")}, r"'teacher': the teacher does not load"),
        ("gkd", "sft.jsonl", {"loss_options": {"beta": -0.5}}, r"'loss_options.beta': must be >= 0"),
    ]
    for i, (loss, data, overrides, message) in enumerate(cases):
        out = tmp_path / f"run{i}"
        with pytest.raises(ConfigError, match=message):
            train(config(setup, out, loss, data, **overrides), copy.deepcopy(task.model), task.tokenizer)
        assert not out.exists(), loss
