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
from alignkit.data.pack import PackedBatch, token_budget_batches
from alignkit.data.tokenize import train_on_prompt
from alignkit.errors import AlignkitError, ConfigError
from alignkit.losses import LossInputs, build_options, get_loss
from alignkit.losses.sft import SFTOptions, sft_loss
from alignkit.models.attention import (
    attention_implementation,
    default_row_tokens,
    loadable_attention,
    set_attention,
)
from alignkit.models.lora import apply_lora, merged_for_save
from alignkit.models.reward import prepare_reward_examples, sequence_rewards
from alignkit.train.checkpoint import (
    load_latest_checkpoint,
    remove_partial_saves,
    restore_training_state,
    save_from_ranks,
)
from alignkit.train.distributed import (
    Dist,
    barrier,
    full_model_state,
    gradient_sync,
    init_distributed,
    shard_steps,
    shutdown,
    sum_over_ranks,
    total_norm,
    wrap_model,
)
from alignkit.train.guards import nonfinite_reason, skip_or_abort
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
                   cfg: TrainConfig, step_mean_lengths: torch.Tensor | None = None, loss_state=None):
    """Per-example losses and metrics of one packed micro-batch. step_mean_lengths: see LossInputs; loss_state:
    what a stateful loss carried over from the training batches before (LossSpec.state)."""
    if spec.output == "rewards":  # a reward model: one scalar per response instead of log-probs
        rewards = sequence_rewards(model, batch).float()
        inputs = LossInputs(logps=None, lengths=batch.seq_lengths.to(rewards.device), rewards=rewards)
    else:  # policy and reference log-probs (and KTO's mismatched pairs, SparsePO's token KL and masks)
        inputs = logprob_inputs(model, batch, spec, opts, ref, cfg.chunk_size)
    inputs.step_mean_lengths = step_mean_lengths
    inputs.loss_state = loss_state
    add_record_fields(inputs, [examples[i] for i in batch.example_indices])
    losses, metrics = spec.fn(inputs, opts)
    metrics = dict(metrics)
    if inputs.logps is not None:
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
def evaluate(model, examples, spec, opts, ref: Reference | None, cfg: TrainConfig, pad_token_id: int,
             loss_state=None) -> dict[str, float]:
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    loss_sum = 0.0
    mean_lengths = mean_trained_lengths(examples, range(len(examples)))
    for indices in eval_batches(examples, cfg):
        batch = pack_batch(examples, indices, cfg, pad_token_id, spec, opts)
        with torch.autocast(_device_type(model), dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            losses, metrics = compute_losses(model, batch, examples, spec, opts, ref, cfg, mean_lengths, loss_state)
        loss_sum += float(losses.sum())
        _accumulate(sums, metrics)
    model.train(was_training)
    result = {"eval/" + k: v for k, v in _mean_metrics(sums, len(examples)).items()}
    result["eval/loss"] = loss_sum / len(examples)
    return result


def load_data(cfg: TrainConfig, tokenizer, shape: str):
    def prep(source):
        examples = prepare_examples(source, tokenizer, shape, cfg.max_length, cfg.max_prompt_length, cfg.on_bad_record)
        return [train_on_prompt(e) for e in examples] if cfg.sft_include_prompt else examples

    train_examples = prep(cfg.train_data)
    if cfg.eval_data is not None:
        return train_examples, prep(cfg.eval_data)
    if cfg.eval_fraction > 0:
        order = list(range(len(train_examples)))
        random.Random(cfg.seed).shuffle(order)
        n_eval = max(1, int(len(order) * cfg.eval_fraction))
        return [train_examples[i] for i in order[n_eval:]], [train_examples[i] for i in order[:n_eval]]
    return train_examples, []


def _device_type(model) -> str:
    return next(model.parameters()).device.type


def prepare_model(model, cfg: TrainConfig, ctx: Dist, reward_model: bool):
    """This rank's device (several processes), gradient checkpointing, LoRA adapters."""
    if reward_model and (cfg.lora is not None or ctx.enabled):
        key = "lora" if cfg.lora is not None else "distributed"
        raise ConfigError(key, "reward-model training runs in one process without lora for now")
    if ctx.device is not None:
        model.to(ctx.device)
    if not reward_model:
        set_attention(model, cfg.attention)
    if cfg.gradient_checkpointing:  # non-reentrant: works with frozen inputs (LoRA), DDP and FSDP2
        if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return apply_lora(model, cfg.lora) if cfg.lora is not None else model


def make_optimizer(params: list, cfg: TrainConfig, ctx: Dist) -> torch.optim.AdamW:
    """AdamW, with torch's fused kernel where it applies (CPU/CUDA tensors; FSDP2's sharded parameters keep the
    default): one pass over each parameter and no temporaries, where the default CPU path makes ~6 passes and
    allocates two parameter-sized temporaries, which made the optimizer step ~5x slower on CPU."""
    fused = not (ctx.enabled and cfg.distributed == "fsdp") and all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, betas=cfg.adam_betas, weight_decay=cfg.weight_decay,
                             fused=fused or None)


def backward_micro_batches(train_model, model, micro_batches, n_examples: int, step_lengths, examples, spec, opts,
                           ref, cfg: TrainConfig, pad_id: int, ctx: Dist,
                           carried: CarriedState | None = None) -> dict[str, float]:
    """Forward + backward of this rank's micro-batches of one step; gradients are reduced over ranks on the
    last one. Returns this rank's sums: '_loss' (its part of the step's mean loss), '_tokens', each metric.
    carried: a stateful loss's state, passed from micro-batch to micro-batch."""
    sums: dict[str, float] = {"_loss": 0.0, "_tokens": 0.0}
    for i, indices in enumerate(micro_batches):
        batch = pack_batch(examples, indices, cfg, pad_id, spec, opts)
        with gradient_sync(train_model, enabled=i == len(micro_batches) - 1):
            with torch.autocast(_device_type(model), dtype=torch.bfloat16, enabled=cfg.precision == "bf16"), \
                    neftune(model, batch, cfg.neftune_alpha):
                losses, metrics = compute_losses(train_model, batch, examples, spec, opts, ref, cfg, step_lengths,
                                                 carried.current() if carried is not None else None)
            if carried is not None:
                carried.absorb(metrics)
            loss = losses.sum() / n_examples  # mean over the whole optimizer step (all ranks), whatever the split
            (loss * ctx.world_size).backward()  # DDP / FSDP2 average gradients over ranks: this makes it the sum
        sums["_loss"] += loss.item()
        sums["_tokens"] += batch.num_tokens
        _accumulate(sums, metrics)
    return sums


def train(cfg: TrainConfig, model=None, tokenizer=None) -> TrainResult:
    """Train `model` (default: load cfg.model) with cfg.loss. Under torchrun every rank runs this same function
    (see train/distributed.py); the results are the same as one process with the same global batches."""
    ctx = init_distributed()
    try:
        return _train(cfg, model, tokenizer, ctx)
    finally:
        shutdown(ctx)


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
    check_record_fields(spec, train_examples + eval_examples)  # e.g. MODPO's other objectives' rewards
    if spec.output == "rewards":  # encoders read [CLS] prompt [SEP] response [SEP]
        train_examples = prepare_reward_examples(model, tokenizer, train_examples, cfg.max_length)
        eval_examples = prepare_reward_examples(model, tokenizer, eval_examples, cfg.max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    steps = plan_steps(train_examples, cfg)
    local_steps = shard_steps(steps, ctx)  # this rank's micro-batches of each step (all of them in one process)
    model = prepare_model(model, cfg, ctx, reward_model=spec.output == "rewards")
    # Only now, with config, data and plan checked, is anything written.
    out_dir = Path(cfg.output_dir)
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(cfg.model_dump(), indent=2))

    ref_model = reference_model(model, spec, opts, cfg)  # a frozen copy, only where a method needs a live reference
    ref_inputs = (model, ref_model, train_examples, eval_examples, local_steps, spec, opts, cfg, pad_id)
    train_ref, eval_ref = score_references(*ref_inputs)  # the starting policy: scored once before any update

    if ctx.is_main:
        remove_partial_saves(out_dir)
    resumed = load_latest_checkpoint(out_dir, model)  # weights now; optimizer, scheduler and RNG once they exist
    train_model = wrap_model(model, cfg.distributed, ctx, lora=cfg.lora is not None)  # the model, or DDP / FSDP2
    optimizer = make_optimizer([p for p in train_model.parameters() if p.requires_grad], cfg, ctx)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, len(steps)))
    start, skipped = restore_training_state(resumed, model, optimizer, scheduler, train_model, ctx)
    carried = CarriedState(spec)  # a stateful loss's state (BCO's reward shift), saved with each checkpoint
    carried.restore(resumed.state if resumed is not None else {})
    if restore_reference(ref_model, resumed, cfg):  # TR-DPO: the reference as it was at the checkpoint
        train_ref, eval_ref = score_references(*ref_inputs, use_cache=False)
    logger = None
    if ctx.is_main:
        _truncate_metrics(out_dir, start)
        logger = MetricsLog(out_dir, len(steps), start, cfg.progress)
    train_model.train()
    metrics_out: dict[str, float] = {}
    try:
        for step in range(start, len(steps)):
            tic = time.perf_counter()
            n_examples = sum(len(mb) for mb in steps[step])  # the whole step, over all ranks
            step_lengths = mean_trained_lengths(train_examples, [i for mb in steps[step] for i in mb])
            sums = sum_over_ranks(backward_micro_batches(train_model, model, local_steps[step], n_examples, step_lengths,
                                                         train_examples, spec, opts, train_ref, cfg, pad_id, ctx,
                                                         carried), ctx)
            loss_total, tokens = sums.pop("_loss"), sums.pop("_tokens")
            grad_norm = float(total_norm(torch.nn.utils.clip_grad_norm_(train_model.parameters(),
                                                                        cfg.max_grad_norm or float("inf"))))
            done = step + 1
            problem = nonfinite_reason(loss_total, grad_norm)  # the same on every rank: both are global values
            if problem is None:
                optimizer.step()
            else:
                skipped = skip_or_abort(problem, done, skipped, cfg)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            carried.end_step(applied=problem is None, ctx=ctx)
            if reference_due(cfg, done):  # TR-DPO: the reference moves towards the policy; its values are recomputed
                update_reference(ref_model, model, update_alpha(cfg))
                train_ref, eval_ref = score_references(*ref_inputs, use_cache=False)
            metrics_out = {"loss": loss_total, "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0],
                           "tokens_per_s": tokens / (time.perf_counter() - tic), "examples": n_examples,
                           **_mean_metrics(sums, n_examples)}
            if problem is not None:  # no NaN in the log: the step's values are dropped
                metrics_out = {"lr": metrics_out["lr"], "examples": n_examples, "skipped": 1, "skipped_steps": skipped}
            last = done == len(steps)
            if eval_examples and (last or cfg.eval_every and done % cfg.eval_every == 0):
                metrics_out.update(evaluate(train_model, eval_examples, spec, opts, eval_ref, cfg, pad_id,
                                            carried.value))
            if logger is not None and (done % cfg.log_every == 0 or last or "eval/loss" in metrics_out):
                logger.write(done, metrics_out)
            if not last and cfg.save_every and done % cfg.save_every == 0:
                save_from_ranks(out_dir, done, model, tokenizer, optimizer, scheduler, train_model, ctx,
                                {"skipped_steps": skipped, **carried.checkpoint()}, cfg.keep_last,
                                checkpoint_models(ref_model, cfg))
    finally:
        if logger is not None:
            logger.close()
    model_state = full_model_state(model, train_model)  # gathered to rank 0 under FSDP2 (every rank calls it)
    model = merged_for_save(model, cfg.lora.save if cfg.lora is not None else "merged")
    if ctx.is_main:
        save_final(model, tokenizer, out_dir / "final", model_state)
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


def _truncate_metrics(out_dir: Path, step: int) -> None:
    """On resume, drop metric lines logged after the checkpoint, so the log has each step once."""
    path = out_dir / "metrics.jsonl"
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
