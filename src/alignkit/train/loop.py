"""The one training loop. Every offline method runs through it: a method is only a loss in the registry.

build -> (reference log-probs, cached) -> for each step: micro-batches -> forward -> loss -> backward
-> clip -> step -> log -> eval -> checkpoint.   Resumes exactly from the newest checkpoint in output_dir."""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from alignkit.config import TrainConfig
from alignkit.data import TokenizedExample, prepare_examples
from alignkit.data.pack import PackedBatch, pack, token_budget_batches
from alignkit.errors import AlignkitError
from alignkit.losses import LossInputs, build_options, get_loss
from alignkit.losses.sft import SFTOptions, sft_loss
from alignkit.models.logprobs import response_logprobs
from alignkit.train.checkpoint import load_latest_checkpoint, save_checkpoint
from alignkit.train.logging import MetricsLog
from alignkit.train.reference import reference_logps, score_examples


@dataclass
class TrainResult:
    model: object
    tokenizer: object
    final_metrics: dict[str, float]
    output_dir: Path


@dataclass
class Reference:
    seq_logps: torch.Tensor  # [n, k]
    token_logps: list[torch.Tensor]  # per example, flat over its responses

    def for_batch(self, batch: PackedBatch):
        idx = batch.example_indices
        return self.seq_logps[idx], torch.cat([self.token_logps[i] for i in idx])


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def plan_steps(examples, cfg: TrainConfig) -> list[list[list[int]]]:
    """Every optimizer step as its list of micro-batches (example indices); fixed by the seed, so a resumed
    run sees exactly the batches it would have seen."""
    steps, epoch = [], 0
    while True:
        batches = token_budget_batches(examples, cfg.max_tokens_per_batch, cfg.seed, epoch)
        for start in range(0, len(batches), cfg.grad_accum):
            steps.append(batches[start:start + cfg.grad_accum])
        epoch += 1
        if cfg.max_steps is None and epoch >= cfg.epochs or cfg.max_steps is not None and len(steps) >= cfg.max_steps:
            break
    return steps[:cfg.max_steps] if cfg.max_steps is not None else steps


def lr_lambda(cfg: TrainConfig, total_steps: int):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if cfg.lr_schedule == "linear":
            return max(0.0, 1 - progress)
        return 1.0
    return factor


def compute_losses(model, batch: PackedBatch, examples: list[TokenizedExample], spec, opts, ref: Reference | None,
                   cfg: TrainConfig):
    """Per-example losses and metrics of one packed micro-batch."""
    out = response_logprobs(model, batch, cfg.chunk_size)
    inputs = LossInputs(logps=out.seq_logps.float(), lengths=out.lengths)
    if ref is not None:
        ref_seq, ref_tokens = ref.for_batch(batch)
        inputs.ref_logps = ref_seq.to(inputs.logps.device)
        if spec.needs_token_logps:
            ref_out = type(out)(ref_tokens.to(out.token_logps.device), ref_seq, out.lengths)
            inputs.ref_token_logps, _ = ref_out.padded(batch)
    if spec.needs_token_logps:
        inputs.token_logps, inputs.token_mask = out.padded(batch)
    chosen = [examples[i] for i in batch.example_indices]
    if "label" in chosen[0].extras:
        inputs.labels = torch.tensor([float(e.extras["label"]) for e in chosen])
    if "scores" in chosen[0].extras:
        inputs.scores = torch.tensor([e.extras["scores"] for e in chosen], dtype=torch.float32)
    losses, metrics = spec.fn(inputs, opts)
    metrics = dict(metrics)
    metrics["logps/chosen"] = inputs.logps[:, 0].detach()
    if inputs.logps.shape[1] > 1:
        metrics["logps/rejected"] = inputs.logps[:, 1].detach()
    if cfg.sft_weight > 0:
        nll, _ = sft_loss(inputs, SFTOptions())
        losses = losses + cfg.sft_weight * nll
        metrics["nll"] = nll.detach()
    return losses, metrics


def _mean_metrics(sums: dict[str, float], count: int) -> dict[str, float]:
    return {key: value / max(count, 1) for key, value in sums.items()}


def _accumulate(sums: dict[str, float], metrics: dict[str, torch.Tensor]) -> None:
    for key, value in metrics.items():
        sums[key] = sums.get(key, 0.0) + float(value.float().sum())


@torch.no_grad()
def evaluate(model, examples, spec, opts, ref: Reference | None, cfg: TrainConfig, pad_token_id: int) -> dict[str, float]:
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    loss_sum = 0.0
    for indices in token_budget_batches(examples, cfg.max_tokens_per_batch, seed=0, shuffle=False):
        batch = pack([examples[i] for i in indices], indices, cfg.max_tokens_per_row, pad_token_id)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            losses, metrics = compute_losses(model, batch, examples, spec, opts, ref, cfg)
        loss_sum += float(losses.sum())
        _accumulate(sums, metrics)
    model.train(was_training)
    result = {"eval/" + k: v for k, v in _mean_metrics(sums, len(examples)).items()}
    result["eval/loss"] = loss_sum / len(examples)
    return result


def load_data(cfg: TrainConfig, tokenizer, shape: str):
    def prep(source):
        return prepare_examples(source, tokenizer, shape, cfg.max_length, cfg.max_prompt_length, cfg.on_bad_record)

    train_examples = prep(cfg.train_data)
    if cfg.eval_data is not None:
        return train_examples, prep(cfg.eval_data)
    if cfg.eval_fraction > 0:
        order = list(range(len(train_examples)))
        random.Random(cfg.seed).shuffle(order)
        n_eval = max(1, int(len(order) * cfg.eval_fraction))
        return [train_examples[i] for i in order[n_eval:]], [train_examples[i] for i in order[:n_eval]]
    return train_examples, []


def train(cfg: TrainConfig, model=None, tokenizer=None) -> TrainResult:
    set_seed(cfg.seed)
    spec = get_loss(cfg.loss)
    opts = build_options(spec, cfg.loss_options)
    if model is None:
        from alignkit.models.resolve import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(cfg.model)
    if cfg.train_data is None:
        raise AlignkitError("config key 'train_data': required (a JSONL or Parquet file)")
    train_examples, eval_examples = load_data(cfg, tokenizer, spec.data_shape)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(cfg.model_dump(), indent=2))

    train_ref = eval_ref = None
    if spec.needs_reference:  # the reference is the starting policy: score once before any update
        ref_args = (cfg.max_tokens_per_batch, cfg.max_tokens_per_row, pad_id, cfg.precision, cfg.chunk_size, cfg.ref_cache)
        train_ref = Reference(*reference_logps(model, train_examples, *ref_args))
        if eval_examples:
            eval_ref = Reference(*reference_logps(model, eval_examples, *ref_args))

    steps = plan_steps(train_examples, cfg)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                  betas=cfg.adam_betas, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, len(steps)))
    resumed = load_latest_checkpoint(out_dir, model, optimizer, scheduler)
    start = resumed["step"] if resumed else 0
    _truncate_metrics(out_dir, start)
    logger = MetricsLog(out_dir, len(steps), start, cfg.progress)
    model.train()
    metrics_out: dict[str, float] = {}
    try:
        for step in range(start, len(steps)):
            tic = time.perf_counter()
            micro_batches = steps[step]
            n_examples = sum(len(mb) for mb in micro_batches)
            sums: dict[str, float] = {}
            loss_total, tokens = 0.0, 0
            for indices in micro_batches:
                batch = pack([train_examples[i] for i in indices], indices, cfg.max_tokens_per_row, pad_id)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                    losses, metrics = compute_losses(model, batch, train_examples, spec, opts, train_ref, cfg)
                loss = losses.sum() / n_examples  # mean over the whole optimizer step, whatever the split
                if not torch.isfinite(loss):
                    raise AlignkitError(f"step {step + 1}: loss is {float(loss)}; lower learning_rate or check the data")
                loss.backward()
                loss_total += loss.item()
                tokens += batch.num_tokens
                _accumulate(sums, metrics)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or float("inf"))
            if not torch.isfinite(grad_norm):
                raise AlignkitError(f"step {step + 1}: gradient norm is {float(grad_norm)}; lower learning_rate")
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            metrics_out = {"loss": loss_total, "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0],
                           "tokens_per_s": tokens / (time.perf_counter() - tic), "examples": n_examples,
                           **_mean_metrics(sums, n_examples)}
            last = done == len(steps)
            if eval_examples and (last or cfg.eval_every and done % cfg.eval_every == 0):
                metrics_out.update(evaluate(model, eval_examples, spec, opts, eval_ref, cfg, pad_id))
            if done % cfg.log_every == 0 or last or "eval/loss" in metrics_out:
                logger.write(done, metrics_out)
            if not last and cfg.save_every and done % cfg.save_every == 0:
                save_checkpoint(out_dir, done, model, tokenizer, optimizer, scheduler, {}, cfg.keep_last)
    finally:
        logger.close()
    save_final(model, tokenizer, out_dir / "final")
    return TrainResult(model, tokenizer, metrics_out, out_dir)


def save_final(model, tokenizer, path: Path) -> None:
    """HF-format model (safetensors) + tokenizer, loadable with AutoModelForCausalLM.from_pretrained."""
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def _truncate_metrics(out_dir: Path, step: int) -> None:
    """On resume, drop metric lines logged after the checkpoint, so the log has each step once."""
    path = out_dir / "metrics.jsonl"
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


__all__ = ["TrainResult", "evaluate", "score_examples", "train"]
