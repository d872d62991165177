"""The offline training loop. Every offline method runs through it: a method is only a loss in the registry.

build -> (reference log-probs, cached) -> for each step: the shared optimizer step (train/step.py: micro-batches
-> forward -> loss -> backward -> clip -> step) -> log -> eval -> checkpoint. Resumes exactly from the newest
checkpoint in output_dir, and refuses a resume whose config changes the run (train/checkpoint.check_resume)."""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
import torch

from alignkit.config import TrainConfig
from alignkit.data import ExampleSettings, TokenizedExample, prepare_examples
from alignkit.data.pack import PackedBatch, token_budget_batches
from alignkit.data.table import select
from alignkit.data.tokenize import train_on_prompt
from alignkit.errors import AlignkitError, ConfigError
from alignkit.losses import LossInputs, build_options, get_loss
from alignkit.losses.sft import SFTOptions, sft_loss
from alignkit.models.attention import attention_implementation, default_row_tokens, loadable_attention
from alignkit.models.inference import eval_mode
from alignkit.models.logprobs import response_logprobs
from alignkit.models.lora import merged_for_save
from alignkit.models.reward import prepare_reward_examples, sequence_rewards
from alignkit.train.checkpoint import (
    check_resume,
    load_latest_checkpoint,
    remove_partial_saves,
    restore_training_state,
    save_from_ranks,
    write_config,
)
from alignkit.train.distributed import (
    Dist,
    barrier,
    full_model_state,
    init_distributed,
    shard_steps,
    shutdown,
    wrap_model,
)
from alignkit.train.logging import MetricsLog
from alignkit.train.loss_inputs import (
    CarriedState,
    add_record_fields,
    check_method_setup,
    check_record_fields,
    eval_batches,
    logprob_inputs,
    pack_batch,
    score_references,
)
from alignkit.train.model_card import training_state, write_model_card
from alignkit.train.neftune import neftune
from alignkit.train.ref_update import (
    checkpoint_models,
    reference_due,
    reference_model,
    restore_reference,
    update_alpha,
    update_reference,
)
from alignkit.train.reference import Reference, score_examples
from alignkit.train.step import Stepper, accumulate, autocast, mean_metrics, prepare_model

log = logging.getLogger("alignkit.train")


@dataclass
class TrainResult:
    model: object
    tokenizer: object
    final_metrics: dict[str, float]
    output_dir: Path


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


def mean_trained_lengths(examples: list[TokenizedExample], indices) -> torch.Tensor:
    """[k] mean loss-carrying token count of each response column over examples[indices] (for token-means);
    a column counts the examples that have it (list data may hold different k)."""
    lengths = [examples[i].trained_lengths for i in indices]
    totals, counts = torch.zeros(max(map(len, lengths))), torch.zeros(max(map(len, lengths)))
    for row in lengths:
        totals[:len(row)] += torch.tensor(row, dtype=torch.float32)
        counts[:len(row)] += 1
    return totals / counts.clamp(min=1)


def compute_losses(model, batch: PackedBatch, examples: list[TokenizedExample], spec, opts, ref: Reference | None,
                   cfg, step_mean_lengths: torch.Tensor | None = None, loss_state=None, experience=None):
    """Per-example losses and metrics of one packed micro-batch. step_mean_lengths: see LossInputs; loss_state:
    what a stateful loss carried over from the training batches before (LossSpec.state); experience: what an
    online rollout adds per example (online/experience.Experience: rewards, behaviour log-probs, advantages)."""
    if spec.output == "rewards":  # a reward model: one scalar per response instead of log-probs
        rewards = sequence_rewards(model, batch).float()
        inputs = LossInputs(logps=None, lengths=batch.seq_lengths.to(rewards.device), rewards=rewards)
    else:  # policy and reference log-probs (and KTO's mismatched pairs, SparsePO's token KL and masks)
        inputs = logprob_inputs(model, batch, spec, opts, ref, cfg.chunk_size)
    inputs.step_mean_lengths = step_mean_lengths
    inputs.loss_state = loss_state
    add_record_fields(inputs, [examples[i] for i in batch.example_indices])
    if experience is not None:
        experience.fill(inputs, batch)
    losses, metrics = spec.fn(inputs, opts)
    metrics = dict(metrics)
    if inputs.engine_token_logps is not None and inputs.token_logps is not None:
        metrics.update(engine_gap(inputs))
    if inputs.logps is not None:
        metrics["logps/chosen"] = inputs.logps[:, 0].detach()
        if inputs.logps.shape[1] > 1:
            metrics["logps/rejected"] = inputs.logps[:, 1].detach()
    if getattr(cfg, "sft_weight", 0) > 0:
        nll, _ = sft_loss(inputs, SFTOptions())
        losses = losses + cfg.sft_weight * nll
        metrics["nll"] = nll.detach()
    return losses, metrics


def engine_gap(inputs) -> dict[str, torch.Tensor]:
    """Per example: the sum and count of |log pi_engine - log pi_trainer| over its sampled tokens, and the largest."""
    gap = (inputs.token_logps.detach() - inputs.engine_token_logps.to(inputs.token_logps.device)).abs()
    gap = torch.where(inputs.token_mask, gap, torch.zeros_like(gap)).flatten(1)
    return {"engine_gap/sum": gap.sum(1), "engine_gap/tokens": inputs.token_mask.flatten(1).sum(1).float(),
            "engine_gap/max": gap.max(1).values}


@torch.no_grad()
def evaluate(model, examples, spec, opts, ref: Reference | None, cfg: TrainConfig, pad_token_id: int,
             loss_state=None) -> dict[str, float]:
    sums: dict[str, float] = {}
    loss_sum = 0.0
    mean_lengths = mean_trained_lengths(examples, range(len(examples)))
    with eval_mode(model):
        for indices in eval_batches(examples, cfg):
            batch = pack_batch(examples, indices, cfg, pad_token_id, spec, opts)
            with autocast(cfg, model):
                losses, metrics = compute_losses(model, batch, examples, spec, opts, ref, cfg, mean_lengths,
                                                 loss_state)
            loss_sum += float(losses.sum())
            accumulate(sums, metrics)
    result = {"eval/" + k: v for k, v in mean_metrics(sums, len(examples)).items()}
    result["eval/loss"] = loss_sum / len(examples)
    return result


def load_data(cfg: TrainConfig, tokenizer, shape: str):
    def prep(source, training=False):
        settings = ExampleSettings(shape, cfg.max_length, cfg.max_prompt_length, cfg.on_bad_record, training)
        examples = prepare_examples(source, tokenizer, settings, cache=cfg.data_cache, progress=cfg.progress)
        return [train_on_prompt(e) for e in examples] if cfg.sft_include_prompt else examples

    train_examples = prep(cfg.train_data, training=True)
    if cfg.eval_data is not None:
        return train_examples, prep(cfg.eval_data)
    if cfg.eval_fraction > 0:
        order = list(range(len(train_examples)))
        random.Random(cfg.seed).shuffle(order)
        n_eval = max(1, int(len(order) * cfg.eval_fraction))
        return select(train_examples, order[n_eval:]), select(train_examples, order[:n_eval])
    return train_examples, []


def offline_forward(train_model, model, examples, step_lengths, spec, opts, ref, cfg: TrainConfig, pad_id: int,
                    carried: CarriedState | None = None):
    """The step's forward for one offline micro-batch (example indices): pack, NEFTune noise, losses."""
    def forward(indices):
        batch = pack_batch(examples, indices, cfg, pad_id, spec, opts)
        with neftune(model, batch, cfg.neftune_alpha):
            losses, metrics = compute_losses(train_model, batch, examples, spec, opts, ref, cfg, step_lengths,
                                             carried.current() if carried is not None else None)
        return losses, metrics, batch.num_tokens
    return forward


def train(cfg: TrainConfig, model=None, tokenizer=None) -> TrainResult:
    """Train `model` (default: load cfg.model) with cfg.loss. Under torchrun every rank runs this same function
    (see train/distributed.py); the results are the same as one process with the same global batches."""
    ctx = init_distributed()
    try:
        return _train(cfg, model, tokenizer, ctx)
    finally:
        shutdown(ctx)


def plan_for_memory(model, steps, examples, spec, cfg: TrainConfig, tokenizer):
    """Each step's micro-batches cut to what fits max_memory_gb (train/memory.py); the steps keep their examples."""
    from alignkit.train import memory

    if spec.output == "rewards":
        raise ConfigError("max_memory_gb", "plans log-prob losses; a reward model's step is not planned yet")

    def forward(batch):
        return response_logprobs(model, batch, cfg.chunk_size).seq_logps.sum()

    model.train()
    per_token = memory.activation_bytes_per_token(model, forward, len(tokenizer))
    tokens = memory.micro_batch_tokens(cfg.max_memory_gb, model, per_token)
    planned = memory.split_to_budget(steps, examples, tokens)
    log.info("max_memory_gb %.2f: %.0f KB kept per token, micro-batches of at most %d tokens (%d forward/backward "
             "passes per step on average, was %d)", cfg.max_memory_gb, per_token / 1e3, tokens,
             round(sum(map(len, planned)) / max(len(planned), 1)), round(sum(map(len, steps)) / max(len(steps), 1)))
    return planned


def _train(cfg: TrainConfig, model, tokenizer, ctx: Dist) -> TrainResult:
    set_seed(cfg.seed)
    spec = get_loss(cfg.loss)
    opts = build_options(spec, cfg.loss_options)
    if cfg.sft_include_prompt and spec.data_shape != "sft":
        raise ConfigError("sft_include_prompt", f"applies to SFT data only; loss '{cfg.loss}' trains on {spec.data_shape}")
    if spec.output == "rewards" and cfg.sft_weight > 0:
        raise ConfigError("sft_weight", f"loss '{cfg.loss}' trains a reward model, which has no log-probs; set 0")
    check_method_setup(spec, opts, cfg, ctx)
    if model is None and spec.output == "rewards":
        from alignkit.models.reward import load_reward_model

        model, tokenizer = load_reward_model(cfg.model)
    elif model is None:
        from alignkit.models.resolve import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(cfg.model, attn_implementation=loadable_attention(cfg.attention))
    device = ctx.device if ctx.device is not None else next(model.parameters()).device
    if cfg.attention == "flex_attention" and torch.device(device).type == "cpu":
        raise ConfigError("attention", "flex_attention trains on GPU only (torch has no CPU backward for it); "
                                       "use sdpa on CPU")
    if cfg.train_data is None:
        raise AlignkitError("config key 'train_data': required (a JSONL or Parquet file)")
    attention = cfg.attention if spec.output != "rewards" else attention_implementation(model)
    cfg = cfg.model_copy(update={"max_tokens_per_row": default_row_tokens(cfg.max_tokens_per_row, attention,
                                                                          cfg.max_tokens_per_batch)})
    train_examples, eval_examples = load_data(cfg, tokenizer, spec.data_shape)
    check_record_fields(spec, chain(train_examples, eval_examples))  # e.g. MODPO's other objectives' rewards
    if spec.output == "rewards":  # encoders read [CLS] prompt [SEP] response [SEP]
        train_examples = prepare_reward_examples(model, tokenizer, train_examples, cfg.max_length)
        eval_examples = prepare_reward_examples(model, tokenizer, eval_examples, cfg.max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    steps = plan_steps(train_examples, cfg)
    model = prepare_model(model, cfg, ctx, reward_model=spec.output == "rewards")
    if cfg.max_memory_gb is not None:
        steps = plan_for_memory(model, steps, train_examples, spec, cfg, tokenizer)
    local_steps = shard_steps(steps, ctx)  # this rank's micro-batches of each step (all of them in one process)
    # Only now, with config, data and plan checked, is anything written (a resume is checked first).
    out_dir = Path(cfg.output_dir)
    check_resume(out_dir, cfg)
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_config(out_dir, cfg)

    ref_model = reference_model(model, spec, opts, cfg)  # a frozen copy, only where a method needs a live reference
    ref_inputs = (model, ref_model, train_examples, eval_examples, local_steps, spec, opts, cfg, pad_id)
    train_ref, eval_ref = score_references(*ref_inputs)  # the starting policy: scored once before any update

    if ctx.is_main:
        remove_partial_saves(out_dir)
    resumed = load_latest_checkpoint(out_dir, model)  # weights now; optimizer, scheduler and RNG once they exist
    train_model = wrap_model(model, cfg.distributed, ctx)  # the model, or DDP / FSDP2
    stepper = Stepper.build(train_model, cfg, ctx, len(steps))
    start, stepper.skipped = restore_training_state(resumed, model, stepper.optimizer, stepper.scheduler,
                                                    train_model, ctx)
    stepper.steps_done = start
    carried = CarriedState(spec)  # a stateful loss's state (BCO's reward shift), saved with each checkpoint
    carried.restore(resumed.state if resumed is not None else {})
    if restore_reference(ref_model, resumed, cfg):  # TR-DPO: the reference as it was at the checkpoint
        train_ref, eval_ref = score_references(*ref_inputs, use_cache=False)
    logger = None
    if ctx.is_main:
        _truncate_metrics(out_dir, start)
        logger = MetricsLog(out_dir, len(steps), start, cfg.progress, cfg)
    train_model.train()
    metrics_out: dict[str, float] = {}
    try:
        for step in range(start, len(steps)):
            n_examples = sum(len(mb) for mb in steps[step])  # the whole step, over all ranks
            step_lengths = mean_trained_lengths(train_examples, [i for mb in steps[step] for i in mb])
            forward = offline_forward(train_model, model, train_examples, step_lengths, spec, opts, train_ref, cfg,
                                      pad_id, carried)
            metrics_out = stepper.step(local_steps[step], n_examples, forward, carried)
            done = step + 1
            if reference_due(cfg, done):  # TR-DPO: the reference moves towards the policy; its values are recomputed
                update_reference(ref_model, model, update_alpha(cfg))
                train_ref, eval_ref = score_references(*ref_inputs, use_cache=False)
            last = done == len(steps)
            if eval_examples and (last or cfg.eval_every and done % cfg.eval_every == 0):
                metrics_out.update(evaluate(train_model, eval_examples, spec, opts, eval_ref, cfg, pad_id,
                                            carried.value))
            if logger is not None and (done % cfg.log_every == 0 or last or "eval/loss" in metrics_out):
                logger.write(done, metrics_out)
            if not last and cfg.save_every and done % cfg.save_every == 0:
                save_from_ranks(out_dir, done, model, tokenizer, stepper.optimizer, stepper.scheduler, train_model,
                                ctx, {"skipped_steps": stepper.skipped, **carried.checkpoint()}, cfg.keep_last,
                                checkpoint_models(ref_model, cfg))
    finally:
        if logger is not None:
            logger.close()
    model_state = full_model_state(model, train_model)  # gathered to rank 0 under FSDP2 (every rank calls it)
    model = merged_for_save(model, cfg.lora.save if cfg.lora is not None else "merged")
    if ctx.is_main:
        save_final(model, tokenizer, out_dir / "final", model_state)
        write_model_card(out_dir / "final", training_state(cfg, metrics_out, len(steps)))
    barrier(ctx)
    return TrainResult(model, tokenizer, metrics_out, out_dir)


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


def _truncate_metrics(out_dir: Path, step: int, name: str = "metrics.jsonl") -> None:
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


__all__ = ["TrainResult", "evaluate", "score_examples", "train"]
