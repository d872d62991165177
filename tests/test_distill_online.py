"""Distillation as online methods (online/methods.py: opd, gkd) on the synthetic review task: the SFT'd tiny Llama
distilled toward a teacher tuned on positive answers (synthetic_task.aligned_model). The teacher's log-probs in the
experience equal separate runs of it; both methods bring the student toward the teacher; a crash resumes exactly;
bad setups are refused in one line before anything is written."""

from __future__ import annotations

import copy

import pytest
import torch

from alignkit.errors import ConfigError
from alignkit.online import OnlineInputs, online_config, run_online
from alignkit.online.advantages import RunningMoments
from alignkit.online.experience import RoundContext, Scorer, distill_experience
from alignkit.online.rollout import RolloutShape, generate_rollout
from alignkit.train.logging import read_metrics
from alignkit.train.packing import Packing
from synthetic_task import SENTIMENT, aligned_model, prompts
from test_online_guarantees import crash_in_round, without_timing

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher_dir(task, tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher")
    aligned_model().save_pretrained(path)
    task.tokenizer.save_pretrained(path)
    return str(path)


def values(method: str, out, teacher, **overrides) -> dict:
    base = dict(method=method, model="tiny", prompts="-", output_dir=str(out), teacher=teacher, rounds=6,
                prompts_per_round=8, num_samples=4, max_new_tokens=10, max_length=64, max_tokens_per_batch=1024,
                max_tokens_per_row=512, learning_rate=1e-3, eval_samples=2, progress=False)
    return {**base, **overrides}


def run(task, method: str, out, teacher, **overrides):
    cfg = online_config(values(method, out, teacher, **overrides))
    return run_online(cfg, copy.deepcopy(task.model), task.tokenizer,
                      OnlineInputs(prompts(64, seed=41), prompts(16, seed=42), SENTIMENT))


def test_experience_holds_the_teachers_log_probs_of_the_samples(task, teacher_dir):
    teacher = aligned_model()
    cfg = online_config(values("opd", "unused", teacher_dir))
    rollout = generate_rollout(copy.deepcopy(task.model), task.tokenizer, prompts(3, seed=5), SENTIMENT,
                               cfg.sampling, RolloutShape(2, 48, seed=1))
    packing = Packing.from_config(cfg, task.tokenizer)
    scorer = Scorer(task.model, task.model, packing)
    from alignkit.losses import build_options, get_loss

    opts = build_options(get_loss("opd"), {})
    experience = distill_experience(rollout, RoundContext(cfg, opts, scorer, None, RunningMoments(), None,
                                                          teacher=teacher))
    for example, flat in zip(rollout.examples, experience.per_token["teacher_token_logps"]):
        expected = []
        for response in example.response_ids:
            ids = torch.tensor([example.prompt_ids + response])
            with torch.no_grad():
                logps = torch.log_softmax(teacher(ids).logits[0], -1)
            positions = torch.arange(len(example.prompt_ids) - 1, ids.shape[1] - 1)
            expected.append(logps[positions, torch.tensor(response)])
        torch.testing.assert_close(flat, torch.cat(expected), rtol=0, atol=2e-5)


def mean_of(rows, key, part):
    picked = [row[key] for row in rows][part]
    return sum(picked) / len(picked)


@pytest.mark.parametrize("method,options,metric", [("opd", {}, "distill/reverse_kl"),
                                                   ("gkd", {"beta": 1.0}, "distill/divergence")])
def test_distillation_brings_the_student_toward_the_teacher(task, tmp_path, teacher_dir, method, options, metric):
    result = run(task, method, tmp_path, teacher_dir, **options)
    rows = result.rounds
    assert metric in rows[0], sorted(rows[0])
    start, end = mean_of(rows, metric, slice(0, 2)), mean_of(rows, metric, slice(-2, None))
    print(f"{method}: {metric} {start:.3f} -> {end:.3f}; reward {result.summary['reward_start']:+.3f} -> "
          f"{result.summary['reward_final']:+.3f}")
    assert end < 0.7 * start  # the divergence to the teacher falls
    # the teacher was tuned toward positive answers: the student's held-out reward follows it
    assert result.summary["reward_final"] > result.summary["reward_start"]


@pytest.mark.parametrize("asynchronous", [None, {"max_staleness": 2, "partial": True}], ids=["sync", "partial"])
def test_opd_crash_and_resume_is_exact(task, tmp_path, teacher_dir, asynchronous):
    """Also with partial rollouts (each round in two segments, the later one by the next version): stopped in round
    3 with round 4 half-sampled in the checkpoint."""
    common = dict(rounds=4, save_every=1, keep_last=5, eval_before_after=False,
                  **({"async": asynchronous} if asynchronous else {}))
    run(task, "opd", tmp_path / "straight", teacher_dir, **common)
    crash_in_round(3, lambda: run(task, "opd", tmp_path / "crashed", teacher_dir, **common))
    resumed = run(task, "opd", tmp_path / "crashed", teacher_dir, **common)
    assert [r["round"] for r in resumed.rounds] == [3, 4]
    assert without_timing(read_metrics(tmp_path / "crashed")) == without_timing(read_metrics(tmp_path / "straight"))


def test_bad_distillation_setups_are_refused_before_anything_is_written(task, tmp_path, teacher_dir):
    cases = [
        ("opd", None, {}, r"'teacher': method opd needs a teacher"),
        ("grpo", teacher_dir, {}, r"'teacher': method grpo has no teacher; leave teacher unset"),
        ("opd", str(tmp_path / "nowhere"), {}, r"'teacher': the teacher does not load"),
        ("gkd", teacher_dir, {"beta": 1.5}, r"'loss_options.beta': must be <= 1"),
        ("gkd", teacher_dir, {"lmbda": 0.5}, r"'prompts': lmbda < 1 without seq_kd trains the rounds the student does "
                                             r"not sample on the dataset's completions"),
        ("opd", teacher_dir, {"seq_kd": True}, r"'seq_kd': GKD's mixing of student and teacher samples: method gkd"),
    ]
    for i, (method, teacher, options, message) in enumerate(cases):
        out = tmp_path / f"run{i}"
        with pytest.raises(ConfigError, match=message):
            run(task, method, out, teacher, **options)
        assert not out.exists(), method


def test_gkd_lambda_mixes_student_and_teacher_sampled_rounds(task, tmp_path, teacher_dir):
    from alignkit.online.sampling import student_samples

    assert all(student_samples(0, r, 1.0) for r in range(50)) and not any(student_samples(0, r, 0.0) for r in range(50))
    assert 70 < sum(student_samples(0, r, 0.5) for r in range(200)) < 130
    seed = online_config(values("gkd", "unused", teacher_dir)).seed
    mixed = run(task, "gkd", tmp_path / "mixed", teacher_dir, lmbda=0.5, seq_kd=True, eval_before_after=False)
    flags = [row["student_sampled"] for row in mixed.rounds]
    assert flags == [float(student_samples(seed, r, 0.5)) for r in range(len(flags))] and 0 < sum(flags) < len(flags)
    common = dict(rounds=2, eval_before_after=False, learning_rate=1e-9)
    teacher_sampled = run(task, "gkd", tmp_path / "teacher", teacher_dir, lmbda=0.0, seq_kd=True, **common)
    student_sampled = run(task, "gkd", tmp_path / "student", teacher_dir, **common)
    # the teacher was tuned toward positive answers: its samples score higher than the student's
    mean = lambda result: sum(r["rollout_reward"] for r in result.rounds) / len(result.rounds)  # noqa: E731
    print(f"rollout reward: teacher-sampled {mean(teacher_sampled):+.3f}, student-sampled {mean(student_sampled):+.3f}")
    assert mean(teacher_sampled) > mean(student_sampled) + 0.05
    assert "engine_gap_mean" not in teacher_sampled.rounds[0] and "engine_gap_mean" in student_sampled.rounds[0]
