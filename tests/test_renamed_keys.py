"""Renamed keys (docs/glossary.md): each, given under its old name, still runs, with one log line naming the new
key; PPO's old `kl_coef`, whose meaning changed, is refused rather than read one way."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from alignkit.cli import main
from alignkit.data.load import write_jsonl_atomic
from alignkit.data.synthetic import prompt_records
from alignkit.errors import ConfigError
from alignkit.losses import build_options, get_loss
from alignkit.recipes.align import run_align
from alignkit.recipes.rl import run_rl, shipped
from synthetic_task import prompts

pytestmark = pytest.mark.usefixtures("one_thread")


def lines_naming(caplog, new: str) -> list[str]:
    """The log lines saying a key is now `new` (a config key, or a loss option)."""
    return [m for m in (r.getMessage() for r in caplog.records) if f"now '{new}'" in m or f"now loss_options.{new} " in m]


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    write_jsonl_atomic(path, [{"prompt": p} for p in prompts(16, seed=8)])
    return str(path)


@pytest.mark.parametrize("old, new", [
    (["--epochs", "2"], "num_iterations"),
    (["--evaluate", "false"], "eval_before_after"),
    (["--method", "ppo", "--kl_loss_coef", "0.01"], "kl_coef"),
    (["--method", "grpo", "--tis_cap", "2.0"], "engine_correction"),
])
def test_old_online_keys_train_and_name_the_new_key(task, tmp_path, prompt_file, caplog, old, new):
    caplog.set_level(logging.INFO, logger="alignkit")
    method = [] if "--method" in old else ["--method", "rloo"]
    args = ["online", *method, *old, "--model", str(task.model_dir), "--prompts", prompt_file, "--output_dir",
            str(tmp_path / "run"), "--rounds", "1", "--prompts_per_round", "4", "--max_new_tokens", "6",
            "--max_length", "64", "--eval_samples", "1", "--progress", "false"]
    assert main(args) == 0
    assert len(lines_naming(caplog, new)) == 1
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()


def test_tis_cap_gives_the_numbers_of_token_truncate_below_the_cap():
    """tis_cap C (the earlier key) is engine_correction token_truncate with engine_ratio_max C: the same loss."""
    from test_loss_metrics import group_inputs

    spec = get_loss("grpo")
    losses = []
    for values in ({"tis_cap": 1.2}, {"engine_correction": "token_truncate", "engine_ratio_max": 1.2}):
        inputs = group_inputs(seed=3)[-1]
        inputs.engine_token_logps = inputs.old_token_logps + 0.2
        losses.append(spec.fn(inputs, build_options(spec, {"kl_coef": 0.0, **values}))[0])
    assert torch.equal(losses[0], losses[1])
    inputs = group_inputs(seed=3)[-1]
    inputs.engine_token_logps = inputs.old_token_logps + 0.2
    assert not torch.equal(spec.fn(inputs, build_options(spec, {"kl_coef": 0.0}))[0], losses[0])


def test_ppo_kl_coef_of_an_old_config_is_refused_not_reread():
    spec = get_loss("ppo")
    with pytest.raises(ConfigError, match="kl_reward_coef") as err:
        build_options(spec, {"kl_coef": 0.05})
    assert err.value.key == "loss_options.kl_coef"
    opts = build_options(spec, {"kl_coef": 0.01, "kl_reward_coef": 0.05})  # the new names, both given
    assert (opts.kl_coef, opts.kl_reward_coef) == (0.01, 0.05)
    assert build_options(spec, {"kl_loss_coef": 0.02}).kl_coef == 0.02


@pytest.mark.parametrize("command, new, written", [
    (["generate", "--backend", "hf"], "sampling.engine", "samples.jsonl"),
    (["decode", "--method", "bon", "--n", "2", "--reward", "synthetic"], "num_samples", "decoded.jsonl"),
    (["synth", "--method", "magpie", "--n", "4"], "num_prompts", "data.jsonl"),
])
def test_old_decoding_keys_run_and_name_the_new_key(task, tmp_path, prompt_file, caplog, command, new, written):
    caplog.set_level(logging.INFO, logger="alignkit")
    args = [*command, "--model", str(task.model_dir), "--output_dir", str(tmp_path / "out"), "--max_new_tokens", "6"]
    if command[0] != "synth":
        args += ["--prompts", prompt_file]
    assert main(args) == 0
    assert len(lines_naming(caplog, new)) == 1
    assert (tmp_path / "out" / written).exists()


def test_old_align_keys_train_and_name_the_new_keys(task, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="alignkit")
    path = tmp_path / "prompts.jsonl"
    write_jsonl_atomic(path, prompt_records(10, seed=0))
    summary = run_align(overrides={"model": str(task.model_dir), "prompts": str(path), "output_dir": str(tmp_path / "run"),
                                   "train_prompts": 6, "eval_prompts": 4, "samples_per_prompt": 2, "max_new_tokens": 5,
                                   "epochs": 1, "min_reward_gap": 0.0, "precision": "fp32"})
    assert len(summary["rewards_before"]) == 4
    for new in ("num_train_prompts", "num_eval_prompts"):
        assert len(lines_naming(caplog, new)) == 1


def test_old_rl_key_trains_and_names_the_new_key(task, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="alignkit")
    summary = run_rl(overrides={"model": str(task.model_dir), "output_dir": str(tmp_path), "rounds": 1,
                                "prompts_per_round": 4, "num_samples": 2, "train_prompts": shipped("rl_train.jsonl"),
                                "sampling": {"max_new_tokens": 6, "batch_size": 32},
                                "eval_sampling": {"max_new_tokens": 6, "batch_size": 96}, "eval_samples": 1,
                                "kl_answers": 4, "precision": "fp32"})
    assert summary["samples"] == 1 * 4 * 2
    assert len(lines_naming(caplog, "online.prompts")) == 1
    rounds = [json.loads(line) for line in (tmp_path / "online" / "metrics.jsonl").read_text().splitlines()]
    assert len(rounds) == 1
