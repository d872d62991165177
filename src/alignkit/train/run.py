"""One training run's lifecycle, shared by offline training (train/loop.py) and online rounds (online/run.py): the
seed, the model made ready and wrapped for the processes, the optimizer step (train/step.Stepper), resume (the saved
config checked, partial saves removed, the newest checkpoint and training state restored, the metric files cut back
to it), the metrics log, periodic checkpoints and the final save. The callers keep only their plan."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from alignkit.models.lora import merged_for_save
from alignkit.train.checkpoint import (
    CheckpointParts,
    Resumed,
    check_resume,
    load_latest_checkpoint,
    remove_partial_saves,
    restore_training_state,
    save_from_ranks,
    write_config,
)
from alignkit.train.distributed import Dist, barrier, full_model_state, wrap_model
from alignkit.train.logging import MetricsLog
from alignkit.train.model_card import training_state, write_model_card
from alignkit.train.step import Stepper, prepare_model


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Run:
    """cfg: the command's config (the shared keys of config.OptimConfig); ctx: this process's place among the
    processes (train/distributed.Dist). Its parts are set as the caller reaches them: `prepare` (the model),
    `resume` (the step and what a checkpoint restored), `open_log` (the metrics log)."""

    def __init__(self, cfg, ctx: Dist, tokenizer=None):
        self.cfg, self.ctx, self.tokenizer = cfg, ctx, tokenizer
        self.out_dir = Path(cfg.output_dir)
        self.model = self.train_model = self.stepper = self.resumed = self.log = None
        self.start = 0  # the first step (offline) or round (online) to run

    def open(self) -> None:
        """Refuse a resume whose config changes the run, then write config.json: before anything else is written."""
        check_resume(self.out_dir, self.cfg)
        if self.ctx.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_config(self.out_dir, self.cfg)

    def prepare(self, model, reward_model: bool = False):
        """The model on this rank's device, with its attention, recomputation and LoRA set (train/step.prepare_model)."""
        self.model = prepare_model(model, self.cfg, self.ctx, reward_model)
        return self.model

    def resume(self, total_steps: int, trained=None, groups: list | None = None) -> Resumed | None:
        """Remove partial saves, load the newest checkpoint's weights, wrap `trained` (default: the model) for the
        processes, build the step over total_steps and restore its optimizer, schedule and RNG. groups: the
        optimizer's parameter groups (default: every trainable parameter)."""
        if self.ctx.is_main:
            remove_partial_saves(self.out_dir)
        self.resumed = load_latest_checkpoint(self.out_dir, self.model)
        self.train_model = wrap_model(trained if trained is not None else self.model, self.cfg.distributed, self.ctx)
        self.stepper = Stepper.build(self.train_model, self.cfg, self.ctx, total_steps, groups)
        self.start, self.stepper.skipped = restore_training_state(self.resumed, self.model, self.stepper.optimizer,
                                                                  self.stepper.scheduler, self.train_model, self.ctx)
        self.stepper.steps_done = self.saved.get("steps_done", self.start)
        return self.resumed

    @property
    def saved(self) -> dict:
        """trainer_state.json of the checkpoint resumed from ({} on a fresh start)."""
        return self.resumed.state if self.resumed is not None else {}

    def open_log(self, total: int, *others: str) -> None:
        """The metrics log (rank 0), after cutting metrics.jsonl and `others` back to the resumed step."""
        if not self.ctx.is_main:
            return
        for name in ("metrics.jsonl", *others):
            truncate_metrics(self.out_dir, self.start, name)
        self.log = MetricsLog(self.out_dir, total, self.start, self.cfg.progress, self.cfg)

    def write(self, done: int, metrics: dict, force: bool = False) -> None:
        """Log step `done` every log_every steps, and whenever `force` (the last step, an evaluation)."""
        if self.log is not None and (done % self.cfg.log_every == 0 or force):
            self.log.write(done, metrics)

    def close_log(self) -> None:
        if self.log is not None:
            self.log.close()

    def save(self, done: int, state: dict, extra_models: dict | None = None) -> None:
        """Checkpoint `done` from every rank: the model, optimizer, schedule and RNG, the step counts and `state`;
        extra_models: file name -> module saved beside the policy (a moving reference, PPO's value head)."""
        stepper = self.stepper
        state = {"skipped_steps": stepper.skipped, "steps_done": stepper.steps_done, **state}
        parts = CheckpointParts(self.model, self.tokenizer, stepper.optimizer, stepper.scheduler, state,
                                extra_models=extra_models)
        save_from_ranks(self.out_dir, done, parts, self.train_model, self.ctx, self.cfg.keep_last)

    def finish(self, metrics: dict, steps: int):
        """final/ in HF format (LoRA merged or kept as adapters, per lora.save) with its model card; returns the
        model as saved. Every rank calls this."""
        model_state = full_model_state(self.model, self.train_model)  # gathered to rank 0 under FSDP2
        model = merged_for_save(self.model, self.cfg.lora.save if self.cfg.lora is not None else "merged")
        if self.ctx.is_main:
            save_final(model, self.tokenizer, self.out_dir / "final", model_state)
            write_model_card(self.out_dir / "final", training_state(self.cfg, metrics, steps))
        barrier(self.ctx)
        return model


def save_final(model, tokenizer, path: Path, state_dict: dict | None = None) -> None:
    """HF-format model (safetensors) + tokenizer, loadable with AutoModelForCausalLM.from_pretrained (reward
    models: AutoModelForSequenceClassification; LoRA with save: adapter: peft's adapter directory).
    state_dict: the gathered weights where the model's own are sharded (FSDP2)."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a run killed while saving
    model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": state_dict} if state_dict is not None else {}))
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def truncate_metrics(out_dir: Path, step: int, name: str = "metrics.jsonl") -> None:
    """On resume, drop metric lines logged after the checkpoint, so the log has each step once."""
    path = out_dir / name
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if _logged_step(line) <= step]
    path.write_text("".join(line + "\n" for line in keep))


def _logged_step(line: str) -> float:
    """The step of a metrics line; infinite for a blank line or one cut short by a killed run (dropped)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf
