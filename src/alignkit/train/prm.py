"""`alignkit prm`: train a process reward model on stepwise rows (TRL's format), the loss on each step's last token
(losses/prm.py). Padded batches of rows (the packed forward has no per-token head output), through the shared run
lifecycle and optimizer step (train/run.Run, train/step.Stepper): AdamW with its schedule and clipping, bf16 autocast,
the non-finite guard, checkpoints and exact resume as every other command; the model is saved as an HF token
classifier."""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from alignkit.config import OptimConfig
from alignkit.data.stepwise import StepExample, StepSettings, load_stepwise
from alignkit.errors import ConfigError
from alignkit.losses.prm import prm_loss, step_scores
from alignkit.models.prm import labelled_logits
from alignkit.train.distributed import init_distributed, shutdown
from alignkit.train.run import Run, set_seed

log = logging.getLogger(__name__)


class PRMConfig(OptimConfig):
    """The shared optimizer keys (OptimConfig: schedule, precision, clipping, save_every, ...) with a PRM's data."""

    model: str = Field(description="a causal LM to start from (alias, directory or hub id), or a saved PRM")
    train_data: str | list = Field(description="stepwise rows: prompt, completions (the steps), labels (bools)")
    eval_data: str | list | None = Field(None, description="held-out stepwise rows: step accuracy after each epoch")
    output_dir: str = "runs/prm"
    step_separator: str = Field("\n", description="text after every step (TRL's default)")
    max_length: int | None = Field(1024, gt=0, description="tokens of prompt + steps")
    max_completion_length: int | None = Field(None, gt=0, description="tokens of the steps")
    train_on_last_step_only: bool = Field(False, description="label only the last step: an outcome reward model")
    learning_rate: float = Field(1e-5, gt=0.0)
    lr_schedule: Literal["cosine", "linear", "constant"] = "constant"
    epochs: int = Field(1, gt=0)
    batch_size: int = Field(8, gt=0, description="rows per optimizer step")
    on_bad_record: Literal["error", "skip"] = "error"

    def settings(self) -> StepSettings:
        return StepSettings(self.step_separator, self.max_length, self.max_completion_length,
                            self.train_on_last_step_only)


@dataclass
class PRMResult:
    model: object
    tokenizer: object
    output_dir: Path
    history: list[dict] = field(default_factory=list)  # one record per epoch: train/loss, eval/step_accuracy, ...


def batch_loss(model, examples: list[StepExample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss over the batch's labelled steps, p(good) of each step, its label)."""
    logits, labels, _ = labelled_logits(model, [e.input_ids for e in examples], [e.labels for e in examples], pad_id)
    logits = logits.float()  # bf16 under autocast: the loss in fp32
    return prm_loss(logits, labels).mean(), step_scores(logits).detach(), labels


@torch.no_grad()
def step_accuracy(model, examples: list[StepExample], pad_id: int, batch_size: int = 32) -> dict[str, float]:
    """Share of labelled steps whose p(good) is on the label's side of 0.5, and the mean loss."""
    model.eval()
    hits, losses, steps = 0.0, 0.0, 0
    for start in range(0, len(examples), batch_size):
        loss, scores, labels = batch_loss(model, examples[start:start + batch_size], pad_id)
        hits += float(((scores > 0.5) == labels.bool()).sum())
        losses += float(loss) * len(labels)
        steps += len(labels)
    model.train()
    return {"step_accuracy": hits / max(steps, 1), "loss": losses / max(steps, 1)}


def epoch_rows(n_rows: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's optimizer steps as row indices: each epoch shuffles the previous epoch's order again with the
    seed + epoch (replayed from the first here, so a resumed run takes the same batches), in batches."""
    order = list(range(n_rows))
    for past in range(epoch + 1):
        random.Random(seed + past).shuffle(order)
    return [order[start:start + batch_size] for start in range(0, n_rows, batch_size)]


def train_prm(cfg: PRMConfig, model=None, tokenizer=None) -> PRMResult:
    """Train cfg.model (or the model given: a token classifier with 2 labels) on cfg.train_data; writes
    <output_dir>/final (the model and tokenizer, with `step_separator` in prm.json), metrics.jsonl (every step),
    epochs.jsonl (per epoch, with the eval step accuracy) and config.json; resumes from output_dir's newest
    checkpoint (save_every steps). One process (torchrun is refused, as for reward models)."""
    ctx = init_distributed()
    try:
        return _train_prm(cfg, model, tokenizer, ctx)
    finally:
        shutdown(ctx)


def _train_prm(cfg: PRMConfig, model, tokenizer, ctx) -> PRMResult:
    set_seed(cfg.seed)
    if cfg.neftune_alpha:
        raise ConfigError("neftune_alpha", "prm training adds no embedding noise; leave it at 0")
    if model is None:
        from alignkit.models.prm import load_prm

        model, tokenizer = load_prm(cfg.model)
    train_set = load_stepwise(cfg.train_data, tokenizer, cfg.settings(), cfg.on_bad_record)
    eval_set = (load_stepwise(cfg.eval_data, tokenizer, cfg.settings(), cfg.on_bad_record, training=False)
                if cfg.eval_data is not None else [])
    run = Run(cfg, ctx, tokenizer)
    model = run.prepare(model, reward_model=True)  # refuses lora and several processes
    per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    total = cfg.epochs * per_epoch
    run.open()  # data and config checked: only now is anything written
    run.resume(total)
    run.open_log(total, "epochs.jsonl")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    history = _read_epochs(run.out_dir) if run.start else []
    epoch_loss = run.saved.get("epoch_loss", 0.0)  # the resumed epoch's losses so far
    run.train_model.train()
    try:
        for step in range(run.start, total):
            epoch, index = divmod(step, per_epoch)
            if index == 0 or step == run.start:
                batches = epoch_rows(len(train_set), cfg.batch_size, cfg.seed, epoch)
            rows = batches[index]

            def forward(indices, rows=rows):
                loss, _, _ = batch_loss(run.train_model, [train_set[rows[i]] for i in indices], pad_id)
                # the batch's mean over labelled steps, as one value per row: the step divides their sum by the rows
                return loss.expand(len(indices)), {}, sum(len(train_set[rows[i]].input_ids) for i in indices)

            metrics = run.stepper.step([list(range(len(rows)))], len(rows), forward)
            epoch_loss += metrics.get("loss", 0.0)
            done = step + 1
            run.write(done, metrics, force=done == total)
            if done % per_epoch == 0:
                record = {"epoch": done // per_epoch, "train/loss": epoch_loss / per_epoch}
                if eval_set:
                    record.update({f"eval/{k}": v for k, v in step_accuracy(run.train_model, eval_set, pad_id).items()})
                history.append(record)
                epoch_loss = 0.0
                log.info("prm epoch %d: %s", record["epoch"], record)
                with open(run.out_dir / "epochs.jsonl", "a") as f:
                    f.write(json.dumps({"step": done, **record}) + "\n")
            if done < total and cfg.save_every and done % cfg.save_every == 0:
                run.save(done, {"epoch_loss": epoch_loss})
    finally:
        run.close_log()
    save_prm(run.model, tokenizer, run.out_dir / "final", cfg.step_separator)
    run.model.eval()
    return PRMResult(run.model, tokenizer, run.out_dir, history)


def _read_epochs(out_dir: Path) -> list[dict]:
    path = out_dir / "epochs.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [{k: v for k, v in json.loads(line).items() if k != "step"} for line in lines]


def save_prm(model, tokenizer, directory: Path, step_separator: str) -> None:
    """An HF directory (AutoModelForTokenClassification reloads it) plus prm.json: the separator its steps end in."""
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (Path(directory) / "prm.json").write_text(json.dumps({"step_separator": step_separator}))
