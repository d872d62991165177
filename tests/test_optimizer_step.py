"""The optimizer step's options on the synthetic task: AdamW's decoupled weight decay, max_grad_norm (grad_norm is
logged before the clip) and warmup_ratio."""

from __future__ import annotations

import copy

import torch

from alignkit.config import TrainConfig
from alignkit.data.load import write_jsonl_atomic
from alignkit.data.synthetic import preference_records
from alignkit.train.logging import read_metrics
from alignkit.train.loop import train
from alignkit.train.step import lr_lambda


def test_weight_decay_is_decoupled_and_applied_once_per_step(task, tmp_path, one_thread):
    """AdamW's decoupled decay: after one step from the same start on the same batch, the weights with decay w
    differ from those without by exactly -lr * w * the starting weights (the Adam update itself is the same)."""
    write_jsonl_atomic(tmp_path / "pairs.jsonl", [{k: r[k] for k in ("prompt", "chosen", "rejected")}
                                                  for r in preference_records(8, seed=7)])
    start = {k: v.clone() for k, v in task.model.state_dict().items()}
    finals = {}
    for wd in (0.0, 0.1):
        cfg = TrainConfig(model="tiny", train_data=str(tmp_path / "pairs.jsonl"), loss="dpo", max_steps=1,
                          learning_rate=1e-2, lr_schedule="constant", weight_decay=wd, max_length=64,
                          output_dir=str(tmp_path / f"wd{wd}"), progress=False, ref_cache=False)
        finals[wd] = train(cfg, copy.deepcopy(task.model), task.tokenizer).model.state_dict()
    name = "model.layers.0.mlp.down_proj.weight"
    torch.testing.assert_close(finals[0.1][name] - finals[0.0][name], -1e-2 * 0.1 * start[name], atol=1e-7, rtol=1e-4)
    assert not torch.equal(finals[0.0][name], start[name])  # the step did move the weights


def test_max_grad_norm_clips_the_step(task, tmp_path, one_thread):
    """grad_norm is logged before clipping; a clip far above it changes nothing (bit for bit), a tiny one changes the
    second step's update (AdamW's first step does not depend on the gradient's scale)."""
    write_jsonl_atomic(tmp_path / "pairs.jsonl", [{k: r[k] for k in ("prompt", "chosen", "rejected")}
                                                  for r in preference_records(16, seed=8)])
    finals, rows = {}, {}
    for name, clip in (("none", None), ("huge", 1e9), ("tiny", 1e-4)):
        cfg = TrainConfig(model="tiny", train_data=str(tmp_path / "pairs.jsonl"), loss="dpo", max_steps=2,
                          learning_rate=1e-2, lr_schedule="constant", max_grad_norm=clip, max_length=64,
                          max_tokens_per_batch=200, output_dir=str(tmp_path / name), progress=False, ref_cache=False)
        finals[name] = train(cfg, copy.deepcopy(task.model), task.tokenizer).model.state_dict()
        rows[name] = read_metrics(tmp_path / name)
    assert rows["tiny"][0]["grad_norm"] == rows["none"][0]["grad_norm"] > 1e-4  # logged before the clip
    assert all(torch.equal(finals["huge"][k], finals["none"][k]) for k in finals["none"])
    assert any(not torch.allclose(finals["tiny"][k], finals["none"][k]) for k in finals["none"])


def test_warmup_ratio_sets_the_warmup_as_a_share_of_the_steps():
    ratio = lr_lambda(TrainConfig(model="m", warmup_ratio=0.25, lr_schedule="constant"), 8)
    steps = lr_lambda(TrainConfig(model="m", warmup_steps=2, lr_schedule="constant"), 8)
    assert [ratio(i) for i in range(8)] == [steps(i) for i in range(8)] == [1 / 3, 2 / 3] + [1.0] * 6
    both = lr_lambda(TrainConfig(model="m", warmup_steps=3, warmup_ratio=0.25, lr_schedule="constant"), 8)
    assert [both(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]  # the larger of the two wins
