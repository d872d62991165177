"""On-policy cross-tokenizer distillation (online method uld; `alignkit distill --loss uld --lmbda 1`, TRL GOLD's
on-policy mode): the student samples, each sample is re-tokenised for a teacher with its own byte-level BPE
tokenizer (trained in tests/test_uld.py, no download), and the ULD distance is taken at each aligned group. The
first round's loss equals an independent computation with plain full-logit forwards of both models; rounds move
the student toward the teacher; what uld cannot run with is refused by key (two processes are not: tests/test_distill_ddp.py)."""

from __future__ import annotations

import copy

import pytest
import torch

from alignkit.data.tokenize import TokenizedExample
from alignkit.errors import ConfigError
from alignkit.losses.uld import group_distances
from alignkit.online import OnlineInputs, online_config, run_online
from alignkit.online import run as online_run
from alignkit.recipes.distill import distill_config
from alignkit.train.cross_teacher import CROSS
from alignkit.train.distributed import Dist
from alignkit.train.logging import read_metrics
from synthetic_task import SENTIMENT, prompts
from test_uld import cross_setup  # noqa: F401 - the module fixture: a teacher with its own BPE tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def values(root, out, **overrides) -> dict:
    base = dict(method="uld", model="tiny", prompts="-", output_dir=str(out), teacher=str(root / "teacher"),
                teacher_tokenizer="own", rounds=1, prompts_per_round=4, num_samples=3, max_new_tokens=10,
                max_length=64, max_tokens_per_batch=1024, max_tokens_per_row=512, learning_rate=2e-2,
                eval_before_after=False, progress=False, seed=0)
    return {**base, **overrides}


def run(task, root, out, **overrides):
    cfg = online_config(values(root, out, **overrides))
    return run_online(cfg, copy.deepcopy(task.model), task.tokenizer,
                      OnlineInputs(prompts(64, seed=41), prompts(4, seed=42), SENTIMENT))


def response_logps(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """[len(response), V]: one plain forward of [prompt + response], the rows that predict the response."""
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1:len(prompt) + len(response) - 1]
    return torch.log_softmax(logits.float(), -1)


@torch.no_grad()
def reference_uld(student, teacher, examples: list[TokenizedExample]) -> float:
    """The step's loss from first principles: per sample the mean ULD distance over its aligned groups, per prompt
    the mean over its samples that have groups, then the mean over prompts."""
    per_prompt = []
    for example in examples:
        crossed, distances = example.extras[CROSS], []
        t_example = crossed.teacher_example
        for j, response in enumerate(example.response_ids):
            groups = crossed.groups[j]
            if not groups[0]:
                continue
            t_response = t_example.response_ids[j]
            d = group_distances(response_logps(student, example.prompt_ids, response),
                                response_logps(teacher, t_example.prompt_ids, t_response), groups,
                                (torch.tensor(response), torch.tensor(t_response)))
            distances.append(float(d.mean()))
        per_prompt.append(sum(distances) / max(1, len(distances)))
    return sum(per_prompt) / len(per_prompt)


def test_the_first_rounds_loss_equals_plain_forwards_of_both_models(task, cross_setup, tmp_path, monkeypatch):  # noqa: F811
    seen = {}
    learn = online_run.OnlineRun.learn

    def spy(self, experience, round_index):
        seen.update(examples=experience.examples, student=copy.deepcopy(self.policy), teacher=self.teacher)
        return learn(self, experience, round_index)

    monkeypatch.setattr(online_run.OnlineRun, "learn", spy)
    run(task, cross_setup, tmp_path)
    row = read_metrics(tmp_path)[0]
    merged = sum(len(t) > 1 for e in seen["examples"] for _, groups in e.extras[CROSS].groups for t in groups)
    assert merged > 0  # some groups join several teacher tokens: the alignment is exercised, not the identity
    expected = reference_uld(seen["student"], seen["teacher"], seen["examples"])
    assert row["loss"] == pytest.approx(expected, rel=1e-5)
    assert row["distill/uld"] == pytest.approx(expected, rel=1e-5)


def test_rounds_of_uld_bring_the_student_toward_the_teacher(task, cross_setup, tmp_path):  # noqa: F811
    run(task, cross_setup, tmp_path, rounds=8, prompts_per_round=8)
    rows = [row["distill/uld"] for row in read_metrics(tmp_path)]
    start, end = sum(rows[:2]) / 2, sum(rows[-2:]) / 2
    print(f"uld: {start:.4f} -> {end:.4f}")
    assert end < 0.8 * start


def test_distill_runs_uld_on_policy(task, cross_setup, tmp_path):  # noqa: F811
    cfg = distill_config({"model": "tiny", "teacher": str(cross_setup / "teacher"), "loss": "uld", "lmbda": 1,
                          "teacher_tokenizer": "own", "prompts": "p.jsonl", "output_dir": str(tmp_path)})
    from alignkit.recipes.distill import online_config_of

    online = online_config_of(cfg)
    assert (online.method, online.teacher_tokenizer) == ("uld", "own")


@pytest.mark.parametrize("overrides, key", [
    ({"method": "gkd"}, "teacher_tokenizer"),
    ({"environment": "arithmetic"}, "environment"),
])
def test_what_online_uld_cannot_run_with_is_refused(task, cross_setup, tmp_path, overrides, key):  # noqa: F811
    with pytest.raises(ConfigError) as err:
        run(task, cross_setup, tmp_path / "out", **overrides)
    assert err.value.key == key
    assert not (tmp_path / "out").exists()


def test_uld_mixed_is_refused_and_torchrun_is_not(cross_setup, tmp_path):  # noqa: F811
    with pytest.raises(ConfigError) as err:
        distill_config({"model": "tiny", "teacher": "t", "loss": "uld", "lmbda": 0.5, "train_data": "d.jsonl"})
    assert err.value.key == "loss"
    cfg = online_config(values(cross_setup, tmp_path))
    online_run.check_online_setup(cfg, Dist(rank=0, world_size=2))  # runs: tests/test_distill_ddp.py, uld_online
