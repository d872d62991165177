"""`alignkit distill --teacher T --model S`: one command for distillation, by GKD's lambda (arXiv 2306.13649; TRL's
GKDTrainer(lmbda, seq_kd) and, at lmbda 1, its DistillationTrainer).

lmbda 0 without seq_kd trains on the dataset's completions: `alignkit train --loss gkd|uld` (the teacher's top-k may
come from teacher_cache). Anything else is `alignkit online --method gkd|opd`, whose rounds are drawn, seeded by the
round, as student-sampled (probability lmbda), else teacher-sampled (seq_kd), else the round's records' completions
(online/mixing.py): one run, with the online loop's checkpoints, exact resume and metrics."""

from __future__ import annotations

import copy
from typing import Any, Literal

from pydantic import Field
from rich.console import Console

from alignkit.config import (
    DataSource,
    OptimConfig,
    SamplingOptions,
    TrainConfig,
    load_command_config,
    make_config,
)
from alignkit.errors import ConfigError
from alignkit.losses import build_options, get_loss, loss_option_names
from alignkit.online.config import AsyncOptions, OnlineConfig, RayOptions

console = Console(stderr=True)
# Keys read by one kind of run only: the rounds of the online loop, the epochs of offline training.
ONLINE_KEYS = ("prompts", "eval_prompts", "reward", "rounds", "prompts_per_round", "num_samples", "sampling",
               "num_iterations", "minibatches", "eval_before_after", "eval_samples", "async_rollouts", "ray")
OFFLINE_KEYS = ("eval_data", "epochs", "max_steps", "grad_accum")


def _online(name: str):
    return copy.deepcopy(OnlineConfig.model_fields[name])


def _offline(name: str):
    return copy.deepcopy(TrainConfig.model_fields[name])


class DistillConfig(OptimConfig):
    model: str = Field(description="the student: alias, HF hub id or local directory")
    teacher: str = Field(description="the frozen teacher (alias, directory or hub id); its vocabulary is the "
                         "student's, except with loss uld and teacher_tokenizer: own")
    loss: Literal["gkd", "opd", "uld"] = Field("gkd", description="gkd: generalized JSD over the vocabulary (any "
                                               "lmbda); opd: the teacher's log-probs of the student's samples as the "
                                               "advantage (lmbda 1); uld: cross-tokenizer, on-policy (lmbda 1) or on "
                                               "completions (lmbda 0)")
    lmbda: float = Field(0.5, ge=0, le=1, description="the share of batches (rounds) the student samples (GKD's "
                         "lambda; TRL's default 0.5); 1: on-policy; 0 without seq_kd: the dataset's completions")
    seq_kd: bool = Field(False, description="batches the student does not sample are the teacher's samples "
                         "(sequence-level KD), not the dataset's completions")
    train_data: str | DataSource | None = Field(None, description="records with prompt and completion: needed for "
                                                "lmbda < 1 without seq_kd; the rounds sample its prompts")
    output_dir: str = "runs/distill"
    max_length: int = _online("max_length")
    learning_rate: float = _online("learning_rate")
    lr_schedule: Literal["cosine", "linear", "constant"] = _online("lr_schedule")
    loss_options: dict[str, Any] = _online("loss_options")
    # The online loop's (lmbda > 0 or seq_kd).
    prompts: str | DataSource | None = Field(None, description="prompt records the rounds sample from (default: "
                                             "train_data's prompts); only where no round reads completions")
    eval_prompts: str | DataSource | None = _online("eval_prompts")
    reward: str = Field("synthetic", description="reward spec: scores every round's responses for the metrics "
                        "(opd: also task_reward_coef's term)")
    rounds: int = _online("rounds")
    prompts_per_round: int = _online("prompts_per_round")
    num_samples: int = _online("num_samples")
    sampling: SamplingOptions = _online("sampling")
    num_iterations: int = _online("num_iterations")
    minibatches: int = _online("minibatches")
    eval_before_after: bool = _online("eval_before_after")
    eval_samples: int = _online("eval_samples")
    async_rollouts: AsyncOptions | None = _online("async_rollouts")
    ray: RayOptions | None = _online("ray")
    # Offline training's (lmbda 0 without seq_kd).
    eval_data: str | DataSource | None = _offline("eval_data")
    epochs: int = _offline("epochs")
    max_steps: int | None = _offline("max_steps")
    grad_accum: int = _offline("grad_accum")
    teacher_tokenizer: Literal["shared", "own"] = _offline("teacher_tokenizer")
    teacher_cache: str | None = Field(None, description="with top_k: the teacher's top-k of train_data's completions "
                                      "on disk, built once, then read instead of running the teacher (lmbda 0, or the "
                                      "dataset rounds of a mixed run)")


def offline(cfg: DistillConfig) -> bool:
    """lmbda 0 without seq_kd: every batch is the dataset's, so the run is offline training."""
    return cfg.lmbda == 0 and not cfg.seq_kd


def check_modes(cfg: DistillConfig) -> DistillConfig:
    """What each loss and mode needs, named in one line before anything is loaded."""
    if cfg.loss == "opd" and cfg.lmbda < 1:
        raise ConfigError("lmbda", "opd scores the student's own samples (on-policy, lmbda 1); mixed batches: loss gkd")
    if cfg.loss == "uld" and not offline(cfg) and (cfg.lmbda < 1 or cfg.seq_kd):
        raise ConfigError("loss", "uld runs on the student's samples (lmbda 1) or on the dataset's completions (lmbda 0 "
                                  "without seq_kd), not mixed; use gkd")
    reads_completions = cfg.lmbda < 1 and not cfg.seq_kd
    if reads_completions and cfg.train_data is None:
        raise ConfigError("train_data", "lmbda < 1 without seq_kd trains on the dataset's completions: give records "
                                        "with prompt and completion (or seq_kd: true for the teacher's samples)")
    if reads_completions and cfg.prompts is not None:
        raise ConfigError("prompts", "rounds that read completions take their prompts from train_data (the same "
                                     "records); leave prompts unset")
    if not offline(cfg) and cfg.train_data is None and cfg.prompts is None:
        raise ConfigError("prompts", "the rounds sample from prompt records: give prompts or train_data")
    unread = OFFLINE_KEYS if not offline(cfg) else ONLINE_KEYS
    given = next((key for key in unread if key in cfg.model_fields_set), None)
    if given is not None:
        mode = "offline training (lmbda 0 without seq_kd)" if given in OFFLINE_KEYS else "sampled rounds (lmbda > 0 " \
                                                                                          "or seq_kd)"
        raise ConfigError(given, f"read by {mode} only; this run has lmbda {cfg.lmbda} and seq_kd {cfg.seq_kd}")
    return cfg


def distill_config(config=None, overrides: dict[str, Any] | None = None) -> DistillConfig:
    """The one loader (config.load_command_config), with the loss's options at the top level (--beta 0.5)."""
    names = lambda values: loss_option_names(values.get("loss", "gkd"))  # noqa: E731
    return check_modes(load_command_config(DistillConfig, config, overrides, names))


def _shared(cfg: DistillConfig) -> dict[str, Any]:
    values = cfg.model_dump()
    keys = (*OptimConfig.model_fields, "model", "teacher", "teacher_tokenizer", "max_length", "loss_options",
            "teacher_cache")
    return {key: values[key] for key in keys}


def online_config_of(cfg: DistillConfig) -> OnlineConfig:
    """The online run: method gkd|opd|uld, its rounds drawn by lmbda and seq_kd."""
    values = cfg.model_dump()
    prompts = values["prompts"] if values["prompts"] is not None else values["train_data"]
    online = {key: values[key] for key in ONLINE_KEYS if key != "prompts"}
    return make_config({**_shared(cfg), **online, "method": cfg.loss, "lmbda": cfg.lmbda, "seq_kd": cfg.seq_kd,
                        "prompts": prompts}, OnlineConfig)


def train_config_of(cfg: DistillConfig) -> TrainConfig:
    """The offline run: loss gkd|uld on train_data's completions (GKD with lambda 0, supervised KD)."""
    values = cfg.model_dump()
    offline_values = {key: values[key] for key in OFFLINE_KEYS}
    train = make_config({**_shared(cfg), **offline_values, "loss": cfg.loss, "train_data": values["train_data"]},
                        TrainConfig)
    train._loss_options = build_options(get_loss(cfg.loss), train.loss_options)
    return train


def run_distill(config=None, overrides: dict[str, Any] | None = None, model=None, tokenizer=None):
    """Run it: offline training at lmbda 0 without seq_kd, else the online loop. Returns that run's result."""
    cfg = distill_config(config, overrides)
    if offline(cfg):
        from alignkit.train.loop import train

        result = train(train_config_of(cfg), model, tokenizer)
    else:
        from alignkit.online.run import run_online

        result = run_online(online_config_of(cfg), model, tokenizer)
    console.print(f"distill ({cfg.loss}, lmbda {cfg.lmbda}{', seq_kd' if cfg.seq_kd else ''}): wrote "
                  f"{result.output_dir}")
    return result


def command_help() -> str:
    from alignkit.config import render_help

    notes = ["loss options: those of the loss (`alignkit gkd --help`, opd, uld), as --loss_options.NAME or just "
             "--NAME (--beta 0.5).",
             "modes: lmbda 1 (on-policy: online gkd, opd or uld), 0 without seq_kd (offline: train --loss gkd|uld on "
             "train_data), in between (one online run, each round drawn: student samples with probability lmbda, "
             "else the teacher's samples with seq_kd, else train_data's completions; metrics student_sampled, "
             "teacher_sampled, dataset_completions). docs/distillation.md."]
    return render_help(DistillConfig, "alignkit distill --teacher T --model S [--lmbda 0.5] [--seq_kd true] "
                                      "[--train_data d.jsonl] [--key value ...]", notes)
