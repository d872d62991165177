"""The one optimizer step, shared by offline training (train/loop.py) and every online round (online/run.py):
micro-batches -> forward (the caller's, through train/method.Method.forward) -> backward with accumulation ->
non-finite guard -> clip -> optimizer step -> LR schedule -> metrics. Also what sets the step up: the model's device,
gradient checkpointing and LoRA (prepare_model), the fused AdamW with parameter groups, the warmup + schedule."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from alignkit.config import OptimConfig
from alignkit.errors import ConfigError
from alignkit.models.attention import set_attention
from alignkit.models.lora import apply_lora
from alignkit.models.saved_tensors import training_forward
from alignkit.train.bf16_moments import Bf16MomentsAdamW
from alignkit.train.distributed import Dist, gradient_sync, sum_over_ranks, total_norm
from alignkit.train.guards import nonfinite_reason, skip_or_abort

# forward(micro_batch) -> (per-example losses, per-example metrics, tokens in the micro-batch)
Forward = Callable[[object], tuple[torch.Tensor, dict[str, torch.Tensor], int]]


def lr_lambda(cfg: OptimConfig, total_steps: int):
    """Linear warmup over warmup_steps (or warmup_ratio of total_steps, whichever is more), then cosine, linear or
    constant to the end of total_steps."""
    warmup = max(cfg.warmup_steps, math.ceil(cfg.warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if cfg.lr_schedule == "linear":
            return max(0.0, 1 - progress)
        return 1.0
    return factor


def release_memory(cfg: OptimConfig) -> bool:
    """release_memory as set, else on where the run asked for less memory (checkpointing, a memory budget): there
    it halves the peak, while a run without them keeps glibc's faster heap reuse."""
    if cfg.release_memory is not None:
        return cfg.release_memory
    return cfg.gradient_checkpointing or getattr(cfg, "max_memory_gb", None) is not None  # (offline only)


def prepare_model(model, cfg: OptimConfig, ctx: Dist, reward_model: bool = False):
    """Freed memory handed back to the OS (release_memory), this rank's device (several processes), packed
    attention, selective recomputation, gradient checkpointing, LoRA adapters."""
    if reward_model and (cfg.lora is not None or ctx.enabled):
        key = "lora" if cfg.lora is not None else "distributed"
        raise ConfigError(key, "reward-model training runs in one process without lora for now")
    if release_memory(cfg):
        from alignkit.train.memory import release_freed_memory

        release_freed_memory()
    if ctx.device is not None:
        model.to(ctx.device)
    if not reward_model:
        set_attention(model, cfg.attention)
    if cfg.selective_recompute:
        from alignkit.models.fused import apply_selective_recompute

        apply_selective_recompute(model)
    if cfg.gradient_checkpointing:  # non-reentrant: works with frozen inputs (LoRA), DDP and FSDP2
        if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return apply_lora(model, cfg.lora) if cfg.lora is not None else model


def make_optimizer(groups: list, cfg: OptimConfig, ctx: Dist) -> torch.optim.AdamW:
    """AdamW over parameter groups (a list of tensors is one group), with torch's fused kernel where it applies
    (CPU/CUDA tensors; FSDP2's sharded parameters keep the default): one pass over each parameter and no
    temporaries, where the default CPU path makes ~6 passes and allocates two parameter-sized temporaries, which
    made the optimizer step ~5x slower on CPU. A group may carry its own lr (PPO's value head). adam_moments bf16:
    train/bf16_moments.py."""
    if groups and isinstance(groups[0], torch.Tensor):
        groups = [{"params": groups}]
    if cfg.adam_moments == "bf16":
        return Bf16MomentsAdamW(groups, lr=cfg.learning_rate, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)
    params = [p for group in groups for p in group["params"]]
    fused = not (ctx.enabled and cfg.distributed == "fsdp") and all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=cfg.adam_betas, weight_decay=cfg.weight_decay,
                             fused=fused or None)


def device_type(model) -> str:
    return next(model.parameters()).device.type


def autocast(cfg: OptimConfig, model):
    """The training forward's context: bf16 autocast where the run asks for it, keeping no weight copy, and the
    saved tensors that are cheap to make again made again in backward (models/saved_tensors: the same gradients)."""
    return training_forward(device_type(model), cfg.precision == "bf16")


def accumulate(sums: dict[str, float], metrics: dict[str, torch.Tensor]) -> None:
    for key, value in metrics.items():
        sums[key] = sums.get(key, 0.0) + float(value.float().sum())


def mean_metrics(sums: dict[str, float], count: int) -> dict[str, float]:
    return {key: value / max(count, 1) for key, value in sums.items()}


@dataclass
class Stepper:
    """What every optimizer step uses: the module the step calls (the model, a policy with a value head, or DDP /
    FSDP2 around it), the optimizer and schedule, the config and the process group; counts steps and skips."""

    train_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    cfg: OptimConfig
    ctx: Dist
    steps_done: int = 0
    skipped: int = 0

    @classmethod
    def build(cls, train_model, cfg: OptimConfig, ctx: Dist, total_steps: int, groups: list | None = None):
        groups = groups if groups is not None else [p for p in train_model.parameters() if p.requires_grad]
        optimizer = make_optimizer(groups, cfg, ctx)
        return cls(train_model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps)),
                   cfg, ctx)

    def parameters(self):
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def step(self, micro_batches: Sequence, n_examples: int, forward: Forward, carried=None) -> dict[str, float]:
        """One optimizer step over this rank's micro_batches; n_examples: the whole step's, over all ranks (the
        loss is their mean whatever the split). carried: a stateful loss's state (train/loss_inputs.CarriedState).
        Returns the step's metrics (summed over ranks): loss, grad_norm, lr, tokens_per_s, examples and the loss's
        metrics averaged per example; a skipped non-finite step returns only lr, examples and the skip counts."""
        tic = time.perf_counter()
        cfg, ctx, model = self.cfg, self.ctx, self.train_model
        sums: dict[str, float] = {"_loss": 0.0, "_tokens": 0.0}
        for i, micro in enumerate(micro_batches):
            with gradient_sync(model, enabled=i == len(micro_batches) - 1):
                with autocast(cfg, model):
                    losses, metrics, tokens = forward(micro)
                if carried is not None:
                    carried.absorb(metrics)
                loss = losses.sum() / n_examples
                (loss * ctx.world_size).backward()  # DDP / FSDP2 average gradients over ranks: this makes it the sum
            sums["_loss"] += loss.item()
            sums["_tokens"] += tokens
            accumulate(sums, metrics)
        sums = sum_over_ranks(sums, ctx)
        loss_total, tokens = sums.pop("_loss"), sums.pop("_tokens")
        grad_norm = float(total_norm(torch.nn.utils.clip_grad_norm_(self.parameters(),
                                                                    cfg.max_grad_norm or float("inf"))))
        self.steps_done += 1
        problem = nonfinite_reason(loss_total, grad_norm)  # the same on every rank: both are global values
        if problem is None:
            self.optimizer.step()
        else:
            self.skipped = skip_or_abort(problem, self.steps_done, self.skipped, cfg)
        self.scheduler.step()
        lr = self.scheduler.get_last_lr()[0]  # the next step's rate, as HF's Trainer logs it
        self.optimizer.zero_grad(set_to_none=True)
        if carried is not None:
            carried.end_step(applied=problem is None, ctx=ctx)
        if problem is not None:  # no NaN in the log: the step's values are dropped
            return {"lr": lr, "examples": n_examples, "skipped": 1, "skipped_steps": self.skipped}
        return {"loss": loss_total, "grad_norm": grad_norm, "lr": lr,
                "tokens_per_s": tokens / (time.perf_counter() - tic), "examples": n_examples,
                **mean_metrics(sums, n_examples)}
