"""`alignkit prm`: train a process reward model on stepwise rows (TRL's format), the loss on each step's last token
(losses/prm.py). One plain loop: batches of rows, padded, AdamW; the model is saved as an HF token classifier."""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from alignkit.config import Strict
from alignkit.data.stepwise import StepExample, StepSettings, load_stepwise
from alignkit.losses.prm import prm_loss, step_scores
from alignkit.models.prm import labelled_logits

log = logging.getLogger(__name__)


class PRMConfig(Strict):
    model: str = Field(description="a causal LM to start from (alias, directory or hub id), or a saved PRM")
    train_data: str | list = Field(description="stepwise rows: prompt, completions (the steps), labels (bools)")
    eval_data: str | list | None = Field(None, description="held-out stepwise rows: step accuracy after each epoch")
    output_dir: str = "runs/prm"
    step_separator: str = Field("\n", description="text after every step (TRL's default)")
    max_length: int | None = Field(1024, gt=0, description="tokens of prompt + steps")
    max_completion_length: int | None = Field(None, gt=0, description="tokens of the steps")
    train_on_last_step_only: bool = Field(False, description="label only the last step: an outcome reward model")
    learning_rate: float = Field(1e-5, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    epochs: int = Field(1, gt=0)
    batch_size: int = Field(8, gt=0, description="rows per optimizer step")
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    seed: int = 0
    on_bad_record: Literal["error", "skip"] = "error"

    def settings(self) -> StepSettings:
        return StepSettings(self.step_separator, self.max_length, self.max_completion_length,
                            self.train_on_last_step_only)


@dataclass
class PRMResult:
    model: object
    tokenizer: object
    output_dir: Path
    history: list[dict] = field(default_factory=list)


def batch_loss(model, examples: list[StepExample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss over the batch's labelled steps, p(good) of each step, its label)."""
    logits, labels, _ = labelled_logits(model, [e.input_ids for e in examples], [e.labels for e in examples], pad_id)
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


def train_prm(cfg: PRMConfig, model=None, tokenizer=None) -> PRMResult:
    """Train cfg.model (or the model given: a token classifier with 2 labels) on cfg.train_data; writes
    <output_dir>/final (the model and tokenizer, with `step_separator` in prm.json), metrics.jsonl and config.json."""
    if model is None:
        from alignkit.models.prm import load_prm

        model, tokenizer = load_prm(cfg.model)
    train_set = load_stepwise(cfg.train_data, tokenizer, cfg.settings(), cfg.on_bad_record)
    eval_set = (load_stepwise(cfg.eval_data, tokenizer, cfg.settings(), cfg.on_bad_record, training=False)
                if cfg.eval_data is not None else [])
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.model_dump(), indent=1, default=str))
    torch.manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order, history = list(range(len(train_set))), []
    model.train()
    for epoch in range(cfg.epochs):
        random.Random(cfg.seed + epoch).shuffle(order)
        total = 0.0
        for start in range(0, len(order), cfg.batch_size):
            loss, _, _ = batch_loss(model, [train_set[i] for i in order[start:start + cfg.batch_size]], pad_id)
            optimizer.zero_grad()
            loss.backward()
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            total += float(loss.detach())
        record = {"epoch": epoch + 1, "train/loss": total / max(1, -(-len(order) // cfg.batch_size))}
        if eval_set:
            record.update({f"eval/{k}": v for k, v in step_accuracy(model, eval_set, pad_id).items()})
        history.append(record)
        log.info("prm epoch %d: %s", epoch + 1, record)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    save_prm(model, tokenizer, out / "final", cfg.step_separator)
    model.eval()
    return PRMResult(model, tokenizer, out, history)


def save_prm(model, tokenizer, directory: Path, step_separator: str) -> None:
    """An HF directory (AutoModelForTokenClassification reloads it) plus prm.json: the separator its steps end in."""
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (Path(directory) / "prm.json").write_text(json.dumps({"step_separator": step_separator}))
