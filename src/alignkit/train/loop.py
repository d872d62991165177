"""The offline training loop. Every offline method runs through it: a method is only a loss in the registry.

build -> (reference log-probs, cached) -> for each step: the shared optimizer step (train/step.py: micro-batches
-> forward -> loss -> backward -> clip -> step) -> log -> eval -> checkpoint. The run's lifecycle (resume, the
metrics log, checkpoints, the final save) is train/run.Run's; a resume is refused when its config changes the run."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from alignkit.config import TrainConfig
from alignkit.errors import AlignkitError, ConfigError
from alignkit.losses.base import needs
from alignkit.models.attention import attention_implementation, loadable_attention
from alignkit.models.inference import eval_mode
from alignkit.models.logprobs import response_logprobs
from alignkit.models.teacher import load_own_teacher, load_teacher
from alignkit.train.cross_teacher import with_teacher_tokens
from alignkit.train.distributed import Dist, init_distributed, shard_steps, shutdown
from alignkit.train.loss_inputs import CarriedState, check_method_setup, mean_trained_lengths
from alignkit.train.method import Method
from alignkit.train.neftune import neftune
from alignkit.train.offline_data import OfflineData, offline_data, plan_steps, score_references
from alignkit.train.packing import Packing
from alignkit.train.ref_update import MovingReference, offline_reference
from alignkit.train.reference import Reference
from alignkit.train.run import Run, set_seed
from alignkit.train.selective import check_selective
from alignkit.train.step import accumulate, autocast, mean_metrics
from alignkit.train.teacher_cache import TeacherCache, check_cache_options

log = logging.getLogger("alignkit.train")


@dataclass
class TrainResult:
    model: object
    tokenizer: object
    final_metrics: dict[str, float]
    output_dir: Path


@torch.no_grad()
def evaluate(model, examples, method: Method, ref: Reference | None, packing: Packing,
             loss_state=None) -> dict[str, float]:
    sums: dict[str, float] = {}
    loss_sum = 0.0
    mean_lengths = mean_trained_lengths(examples, range(len(examples)))
    with eval_mode(model):
        for indices in packing.batches(examples):
            batch = method.pack(examples, indices, packing)
            with autocast(packing, model):
                losses, metrics = method.forward(model, batch, examples, ref, mean_lengths, loss_state)
            loss_sum += float(losses.sum())
            accumulate(sums, metrics)
    result = {"eval/" + k: v for k, v in mean_metrics(sums, len(examples)).items()}
    result["eval/loss"] = loss_sum / len(examples)
    return result


@dataclass
class OfflineTraining:
    """What the offline steps read and move: the run, the method, the data and its plan, the packing, the
    reference (its model, where one moves or runs live, and its values on both sets) and a loss's carried state."""

    run: Run
    method: Method
    data: OfflineData
    packing: Packing
    reference: MovingReference | None
    carried: CarriedState
    train_ref: Reference | None = None
    eval_ref: Reference | None = None

    def score_references(self, **cache) -> None:
        """The reference's values: of the starting policy before any update, or of the moving reference. cache:
        use_cache=False scores afresh (default: from the disk cache where ref_cache is on)."""
        live = self.reference.reference if self.reference is not None else None
        self.train_ref, self.eval_ref = score_references(self.method, self.data, self.packing,
                                                         live if live is not None else self.run.model, live, **cache)

    def step(self, step: int) -> dict[str, float]:
        """Optimizer step `step` (0-based) over its micro-batches: pack, NEFTune noise, losses."""
        examples, micro_batches = self.data.train, self.data.steps[step]
        step_lengths = mean_trained_lengths(examples, [i for mb in micro_batches for i in mb])
        alpha = self.run.cfg.neftune_alpha

        def forward(indices):
            batch = self.method.pack(examples, indices, self.packing)
            with neftune(self.run.model, batch, alpha):
                losses, metrics = self.method.forward(self.run.train_model, batch, examples, self.train_ref,
                                                      step_lengths, self.carried.current())
            return losses, metrics, batch.num_tokens

        n_examples = sum(len(mb) for mb in micro_batches)  # the whole step, over all ranks
        return self.run.stepper.step(self.data.local_steps[step], n_examples, forward, self.carried)

    def evaluate(self) -> dict[str, float]:
        return evaluate(self.run.train_model, self.data.eval, self.method, self.eval_ref, self.packing,
                        self.carried.value)

    def checkpoint(self, done: int) -> None:
        extra = self.reference.checkpoint_models() if self.reference is not None else {}
        self.run.save(done, self.carried.checkpoint(), extra)


def train(cfg: TrainConfig, model=None, tokenizer=None, examples=None) -> TrainResult:
    """Train `model` (default: load cfg.model) with cfg.loss. Under torchrun every rank runs this same function
    (see train/distributed.py); the results are the same as one process with the same global batches. examples:
    tokenised training examples to train on instead of reading cfg.train_data (Selective DPO's fold runs)."""
    ctx = init_distributed()
    try:
        return _train(cfg, model, tokenizer, ctx, examples)
    finally:
        shutdown(ctx)


def plan_for_memory(model, steps, examples, method: Method, cfg: TrainConfig, tokenizer):
    """Each step's micro-batches cut to what fits max_memory_gb (train/memory.py); the steps keep their examples."""
    from alignkit.train import memory

    if method.spec.output == "rewards":
        raise ConfigError("max_memory_gb", "plans log-prob losses; a reward model's step is not planned yet")

    def forward(batch):
        return response_logprobs(model, batch, cfg.chunk_size).seq_logps.sum()

    model.train()
    per_token = memory.activation_bytes_per_token(model, forward, len(tokenizer))
    tokens = memory.micro_batch_tokens(cfg.max_memory_gb, model, per_token, 2 if cfg.adam_moments == "bf16" else 4)
    planned = memory.split_to_budget(steps, examples, tokens)
    log.info("max_memory_gb %.2f: %.0f KB kept per token, micro-batches of at most %d tokens (%d forward/backward "
             "passes per step on average, was %d)", cfg.max_memory_gb, per_token / 1e3, tokens,
             round(sum(map(len, planned)) / max(len(planned), 1)), round(sum(map(len, steps)) / max(len(steps), 1)))
    return planned


def check_offline_setup(cfg: TrainConfig, method: Method, ctx: Dist) -> None:
    """What the loop cannot do with these settings, said before anything is loaded."""
    spec = method.spec
    if cfg.sft_include_prompt and spec.data_shape != "sft":
        raise ConfigError("sft_include_prompt", f"applies to SFT data only; loss '{cfg.loss}' trains on {spec.data_shape}")
    if spec.output == "rewards" and cfg.sft_weight > 0:
        raise ConfigError("sft_weight", f"loss '{cfg.loss}' trains a reward model, which has no log-probs; set 0")
    check_method_setup(spec, method.opts, cfg, ctx)
    check_selective(cfg, spec)


def load_model(cfg: TrainConfig, method: Method, ctx: Dist, model=None, tokenizer=None):
    """cfg.model loaded where no model is given (a reward model for a reward loss), checked against the device
    and the data settings."""
    if model is None and method.spec.output == "rewards":
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
    return model, tokenizer


def offline_teachers(cfg: TrainConfig, method: Method, model, tokenizer, ctx: Dist) -> Method:
    """The method with its frozen teacher (and ADPA's teacher reference) loaded and checked against the student;
    a teacher given to a loss that reads none is refused."""
    wanted = needs(method.opts)
    for key, name in (("teacher", cfg.teacher), ("teacher_reference", cfg.teacher_reference)):
        if (name is not None) != (key in wanted):
            raise ConfigError(key, f"loss '{cfg.loss}' needs a {key}" if key in wanted else
                              f"loss '{cfg.loss}' reads no {key}; leave it unset")
    if cfg.teacher_tokenizer == "own" and "cross_tokenizer" not in wanted:
        raise ConfigError("teacher_tokenizer", f"loss '{cfg.loss}' compares distributions over one vocabulary; a "
                                               "teacher with its own tokenizer needs loss uld")
    if "teacher" not in wanted:
        return method
    device = ctx.device if ctx.device is not None else next(model.parameters()).device
    if cfg.teacher_tokenizer == "own":  # ULD: any vocabulary; the examples are re-tokenised for it
        teacher, teacher_tokenizer = load_own_teacher(cfg.teacher, cfg.precision, cfg.attention)
        return replace(method, teacher=teacher.to(device), teacher_tokenizer=teacher_tokenizer)
    teachers = [load_teacher(name, model, tokenizer, cfg.precision, key, cfg.attention).to(device) if name is not None else None
                for key, name in (("teacher", cfg.teacher), ("teacher_reference", cfg.teacher_reference))]
    own_tokens = tokenizer if "cross_tokenizer" in wanted else None  # ULD with the student's own tokenizer
    return replace(method, teacher=teachers[0], teacher_reference=teachers[1], teacher_tokenizer=own_tokens)


def open_teacher_cache(cfg: TrainConfig, method: Method, data: OfflineData, packing: Packing) -> TeacherCache | None:
    """cfg.teacher_cache checked against this run (a cache of other data, another teacher or k is refused)."""
    if cfg.teacher_cache is None:
        return None
    if method.teacher is None:
        raise ConfigError("teacher_cache", f"loss '{cfg.loss}' has no teacher to cache; leave it unset")
    check_cache_options("teacher_cache", cfg.loss, method.opts, cfg.teacher_reference)
    return TeacherCache.open(cfg.teacher_cache, method.teacher, method.opts, {"train": data.train, "eval": data.eval},
                             packing.precision)


def use_teacher_cache(cache: TeacherCache, method: Method, data: OfflineData, packing: Packing, ctx: Dist) -> Method:
    """The examples with their cached teacher top-k (built now where the cache is new: on every rank, written by
    rank 0) and the method reading them: the teacher no longer runs in the steps, and is let go."""
    sets = cache.fill(method.teacher, method.opts, {"train": data.train, "eval": data.eval}, packing, ctx.is_main)
    data.train, data.eval = sets["train"], sets["eval"]
    return replace(method, teacher=None, teacher_topk=True)


def _train(cfg: TrainConfig, model, tokenizer, ctx: Dist, examples=None) -> TrainResult:
    set_seed(cfg.seed)
    method = Method.from_config(cfg)
    check_offline_setup(cfg, method, ctx)
    model, tokenizer = load_model(cfg, method, ctx, model, tokenizer)
    method = offline_teachers(cfg, method, model, tokenizer, ctx)  # refused before anything is written
    reward_model = method.spec.output == "rewards"
    attention = cfg.attention if not reward_model else attention_implementation(model)
    packing = Packing.from_config(cfg, tokenizer, attention)
    cfg = cfg.model_copy(update={"max_tokens_per_row": packing.max_tokens_per_row})  # as resolved, in config.json
    data = offline_data(cfg, model, tokenizer, method.spec, examples)
    run = Run(cfg, ctx, tokenizer)
    model = run.prepare(model, reward_model)
    if cfg.max_memory_gb is not None:
        data.steps = plan_for_memory(model, data.steps, data.train, method, cfg, tokenizer)
    data.local_steps = shard_steps(data.steps, ctx)  # this rank's micro-batches of each step (all in one process)
    if method.teacher_tokenizer is not None:  # ULD: each example in the teacher's tokenisation, aligned
        data.train, data.eval = (with_teacher_tokens(x, tokenizer, method.teacher_tokenizer)
                                 for x in (data.train, data.eval))
    teacher_cache = open_teacher_cache(cfg, method, data, packing)
    run.open()  # only now, with config, data and plan checked, is anything written
    if teacher_cache is not None:
        method = use_teacher_cache(teacher_cache, method, data, packing, ctx)

    training = OfflineTraining(run, method, data, packing, offline_reference(model, cfg, method.live_reference),
                               CarriedState(method.spec))  # the carried state: a stateful loss's (BCO's shift)
    training.score_references()  # the starting policy: scored once before any update
    run.resume(len(data.steps))  # weights, optimizer, scheduler and RNG of the newest checkpoint
    training.carried.restore(run.saved)
    reference = training.reference
    if run.resumed is not None and reference is not None and reference.checkpoint_models():
        reference.restore(run.resumed.path)  # TR-DPO: the reference as it was at the checkpoint
        training.score_references(use_cache=False)
    run.open_log(len(data.steps))
    run.train_model.train()
    metrics: dict[str, float] = {}
    try:
        for step in range(run.start, len(data.steps)):
            metrics = training.step(step)
            done, last = step + 1, step + 1 == len(data.steps)
            if reference is not None and reference.follow(done, model):  # TR-DPO: towards the policy
                training.score_references(use_cache=False)
            if data.eval and (last or cfg.eval_every and done % cfg.eval_every == 0):
                metrics.update(training.evaluate())
            run.write(done, metrics, force=last or "eval/loss" in metrics)
            if not last and cfg.save_every and done % cfg.save_every == 0:
                training.checkpoint(done)
    finally:
        run.close_log()
    return TrainResult(run.finish(metrics, len(data.steps)), tokenizer, metrics, run.out_dir)


__all__ = ["TrainResult", "evaluate", "plan_steps", "train"]
