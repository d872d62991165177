"""`alignkit online --method grpo|rloo|ppo|online-dpo|self-reward`: rounds of rollout -> experience -> the shared step.

Each round samples k responses for a batch of prompts with the current policy (rollout.py; under torchrun each rank
samples its share of the prompts and the ranks exchange the results), scores them with the reward (or, self-reward,
with the policy as judge), turns them into an Experience with the method's builder (ONLINE_METHODS) and trains on it
with train/step.py's Stepper, the same optimizer step offline training uses. The reference is a frozen copy of the
starting policy (under LoRA: the policy with its adapters off), or of the policy at the start of every
ref_update_every-th round. Checkpoints every save_every rounds resume exactly. Writes metrics.jsonl and rollouts.jsonl
(one line per round), final/ (HF format; PPO adds value_head.safetensors) and summary.json (reward of the starting
and final policy on held-out prompts, and the final policy's KL to the starting one)."""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from alignkit.data.tokenize import TokenizedExample
from alignkit.errors import ConfigError
from alignkit.generate.engines import make_engine, sleep_engine
from alignkit.generate.sample import SamplingConfig
from alignkit.models.inference import frozen_copy
from alignkit.models.lora import merged_for_save
from alignkit.models.value_head import PolicyWithValueHead
from alignkit.online.advantages import RunningMoments
from alignkit.online.config import OnlineConfig, command_help, method_loss, online_config
from alignkit.online.experience import RoundContext, Scorer
from alignkit.online.methods import ONLINE_METHODS
from alignkit.online.rollout import Rollout, generate_rollout, join_rollouts, select_groups
from alignkit.online.self_reward import LLMJudge
from alignkit.train.checkpoint import (
    check_resume,
    load_latest_checkpoint,
    remove_partial_saves,
    restore_training_state,
    save_from_ranks,
    write_config,
)
from alignkit.train.distributed import gather_objects, init_distributed, shutdown, split_for_ranks, wrap_model
from alignkit.train.logging import MetricsLog
from alignkit.train.loop import (
    _truncate_metrics,
    compute_losses,
    mean_trained_lengths,
    save_final,
    set_seed,
)
from alignkit.train.memory import trim_freed_memory
from alignkit.train.model_card import training_state, write_model_card
from alignkit.train.step import Stepper, prepare_model

log = logging.getLogger("alignkit.online")

METHODS = tuple(ONLINE_METHODS)
# In a checkpoint, in sub-folders: its top-level *.safetensors are all loaded as the policy.
VALUE_HEAD_FILE, REFERENCE_FILE, PREVIOUS_FILE = ("value_head/model.safetensors", "reference/model.safetensors",
                                                  "previous_reference/model.safetensors")


@dataclass
class OnlineResult:
    model: object
    tokenizer: object
    summary: dict
    rounds: list[dict]  # the metrics of every round, as in metrics.jsonl
    output_dir: Path
    value_head: torch.nn.Module | None = None


def evaluate_policy(model, tokenizer, prompts: list, reward, sampling: SamplingConfig, num_samples: int,
                    reference=None, max_length: int = 1024, kl: bool = False, policy=None,
                    precision: str = "fp32") -> dict:
    """Mean reward of num_samples samples per prompt and, with kl, the KL estimate mean_y log pi(y)/pi_ref(y) on
    exactly the sampled tokens (unbiased at temperature 1; reference None: the model's LoRA base), scored at the
    run's precision (a bf16 run's reference holds bf16 weights). model: the policy, or an engine holding its weights
    (then `policy` is the policy, for the KL)."""
    from alignkit.eval.kl import example_log_ratios, kl_summary

    rollout = generate_rollout(model, tokenizer, prompts, reward, num_samples, sampling, max_length)
    model = policy if policy is not None else model
    rewards = rollout.rewards[~rollout.rewards.isnan()]
    result = {"reward": float(rewards.mean()) if len(rewards) else float("nan"), "samples": rollout.num_samples}
    if kl:
        singles = [TokenizedExample(e.prompt_ids, [ids]) for e in rollout.examples for ids in e.response_ids]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        summary = kl_summary(example_log_ratios(model, reference, singles, pad, precision=precision))
        result.update(kl=summary["kl"], kl_sem=summary["kl_sem"])
    return result


class Snapshots:
    """The reference (and the previous round's reference, for APO and CREAM) as frozen copies of the policy, with
    bf16 linear weights in a bf16 run (models/inference.frozen_copy: the same log-probs under autocast); under
    LoRA none (the reference is the base: adapters off). `initial` is the starting policy, for the summary's KL."""

    def __init__(self, model, every: int, keep_previous: bool, lora: bool, precision: str = "fp32"):
        self.reference = None if lora else frozen_copy(model, precision)
        self.initial = frozen_copy(model, precision) if every else self.reference
        self.previous = frozen_copy(model, precision) if every and keep_previous else None
        self.every, self.has_previous = every, False

    def start_round(self, round_index: int, model) -> None:
        if not self.every or round_index == 0 or round_index % self.every:
            return
        if self.previous is not None:
            self.previous.load_state_dict(self.reference.state_dict())
            self.has_previous = True
        self.reference.load_state_dict(model.state_dict())

    @property
    def last(self):
        """The previous round's reference, once there is one."""
        return self.previous if self.has_previous else None

    def checkpoint_models(self) -> dict:
        """Moving references are saved with a checkpoint (a fixed one is the starting model, rebuilt on resume)."""
        if not self.every:
            return {}
        return {REFERENCE_FILE: self.reference, **({PREVIOUS_FILE: self.previous} if self.previous is not None else {})}

    def restore(self, path: Path, has_previous: bool) -> None:
        for name, module in self.checkpoint_models().items():
            load_model(module, str(path / name))
        self.has_previous = has_previous


def run_online(cfg: OnlineConfig, model=None, tokenizer=None, *, prompts: list | None = None,
               eval_prompts: list | None = None, reward=None, judge=None) -> OnlineResult:
    """Run cfg.rounds rounds. model/tokenizer: the starting policy (default: load cfg.model); prompts / eval_prompts:
    lists (default: read cfg.prompts / cfg.eval_prompts); reward: a Reward (default: cfg.reward); judge (self-reward):
    a Reward, or a function model -> Reward, standing in for the LLM judge (default: cfg.judge). Under torchrun every
    rank runs this; the result equals one process on the same rollouts."""
    ctx = init_distributed()
    try:
        return _run(cfg, model, tokenizer, prompts, eval_prompts, reward, judge, ctx)
    finally:
        shutdown(ctx)


def _run(cfg: OnlineConfig, model, tokenizer, prompts, eval_prompts, reward, judge, ctx) -> OnlineResult:
    set_seed(cfg.seed)
    method = ONLINE_METHODS[cfg.method]
    spec, opts = method_loss(cfg)
    if ctx.enabled and (cfg.distributed == "fsdp" or cfg.prompts_per_round % ctx.world_size):
        raise ConfigError("distributed" if cfg.distributed == "fsdp" else "prompts_per_round",
                          "online runs ddp (every rank samples with whole weights), with prompts_per_round a multiple "
                          f"of the {ctx.world_size} processes")
    records = _read_records(cfg.prompts) if prompts is None else []
    prompts = prompts if prompts is not None else [r["prompt"] for r in records]
    if eval_prompts is None and cfg.eval_prompts:
        eval_records = _read_records(cfg.eval_prompts)
        records, eval_prompts = records + eval_records, [r["prompt"] for r in eval_records]
    if eval_prompts is None:
        eval_prompts = random.Random(cfg.seed).sample(prompts, min(64, len(prompts)))
    if reward is None:
        from alignkit.rewards.spec import load_reward
        from alignkit.rewards.verifiable.records import bind_records

        reward = bind_records(load_reward(cfg.reward), records)  # rewards that read a record field get theirs
    if model is None:
        from alignkit.models.resolve import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(cfg.model)
    out_dir = Path(cfg.output_dir)
    check_resume(out_dir, cfg)  # before anything is written
    judge_for = _judge_factory(cfg, tokenizer, judge) if method.self_judge else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if ctx.device is not None:
        model.to(ctx.device)  # before the reference copies are made
    snapshots = Snapshots(model, cfg.reference_every, cfg.apo_alpha > 0 or method.self_judge, cfg.lora is not None,
                          cfg.precision)
    policy = prepare_model(model, cfg, ctx)  # device, attention, gradient checkpointing, LoRA
    trained = PolicyWithValueHead(policy) if method.value_head else policy
    train_model = wrap_model(trained, cfg.distributed, ctx)
    groups = trained.parameter_groups(cfg.value_learning_rate) if method.value_head else None
    stepper = Stepper.build(train_model, cfg, ctx, cfg.rounds * cfg.updates_per_round, groups)
    moments = RunningMoments()
    if ctx.is_main:
        remove_partial_saves(out_dir)
    resumed = load_latest_checkpoint(out_dir, policy)
    start, stepper.skipped = restore_training_state(resumed, policy, stepper.optimizer, stepper.scheduler,
                                                    train_model, ctx)
    eval_sampling = SamplingConfig.from_options(cfg.sampling, cfg.seed + 999_983)
    engine = make_engine(policy, tokenizer, eval_sampling)  # updated with the policy's weights after every round
    if resumed is not None:
        state = resumed.state
        stepper.steps_done, moments = state["steps_done"], RunningMoments(**state["moments"])
        if method.value_head:
            load_model(trained.value_head, str(resumed.path / VALUE_HEAD_FILE))
        snapshots.restore(resumed.path, state["has_previous"])
        before = state["before"]
    elif cfg.evaluate:
        before = evaluate_policy(engine, tokenizer, eval_prompts, reward, eval_sampling, cfg.eval_samples,
                                 policy=policy)
    else:
        before = {"reward": None}
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_config(out_dir, cfg)
        for name in ("metrics.jsonl", "rollouts.jsonl"):
            _truncate_metrics(out_dir, start, name)
    order = _prompt_order(len(prompts), cfg.rounds * cfg.prompts_per_round, cfg.seed)
    scorer = Scorer(trained, policy, cfg, pad_id)
    logger = MetricsLog(out_dir, cfg.rounds, start, cfg.progress, cfg) if ctx.is_main else None
    rows = []
    try:
        for round_index in range(start, cfg.rounds):
            snapshots.start_round(round_index, policy)
            batch = order[round_index * cfg.prompts_per_round:(round_index + 1) * cfg.prompts_per_round]
            round_ctx = RoundContext(cfg, opts, scorer, snapshots, moments, judge_for, prompts)
            row, rollout = _round(cfg, spec, opts, method, stepper, engine, policy, tokenizer,
                                  [prompts[i] for i in batch], reward, round_ctx, round_index, pad_id)
            rows.append(row)
            if logger is not None:
                logger.write(round_index + 1, row)
                _append_rollouts(out_dir, round_index + 1, rollout)
            done = round_index + 1
            if done < cfg.rounds and cfg.save_every and done % cfg.save_every == 0:
                extra = {**snapshots.checkpoint_models(), **({VALUE_HEAD_FILE: trained.value_head}
                                                             if method.value_head else {})}
                state = {"skipped_steps": stepper.skipped, "steps_done": stepper.steps_done, "before": before,
                         "moments": asdict(moments), "has_previous": snapshots.has_previous}
                save_from_ranks(out_dir, done, policy, tokenizer, stepper.optimizer, stepper.scheduler, train_model,
                                ctx, state, cfg.keep_last, extra)
    finally:
        if logger is not None:
            logger.close()
    after = evaluate_policy(engine, tokenizer, eval_prompts, reward, eval_sampling, cfg.eval_samples,
                            snapshots.initial, cfg.max_length, kl=True, policy=policy,
                            precision=cfg.precision) if cfg.evaluate else {"reward": None}
    summary = _summary(cfg, before, after, rows)
    policy = merged_for_save(policy, cfg.lora.save if cfg.lora is not None else "merged")
    if ctx.is_main:
        save_final(policy, tokenizer, out_dir / "final")
        write_model_card(out_dir / "final", training_state(cfg, {**(rows[-1] if rows else {}), **summary},
                                                           stepper.steps_done))
        if method.value_head:
            save_model(trained.value_head, str(out_dir / "final" / "value_head.safetensors"))
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return OnlineResult(policy, tokenizer, summary, rows, out_dir, trained.value_head if method.value_head else None)


def _round(cfg: OnlineConfig, spec, opts, method, stepper: Stepper, engine, policy, tokenizer, prompts: list, reward,
           round_ctx: RoundContext, round_index: int, pad_id: int) -> tuple[dict, Rollout]:
    """One rollout -> experience -> shared-step round; its metrics, with the seconds each part took. The engine
    gets the new weights once the round's optimizer steps are done (it samples only between rounds)."""
    cpu = time.process_time()
    rollout, sampling_metrics = _collect_rollout(cfg, engine, policy, tokenizer, prompts, reward, round_ctx,
                                                 round_index, stepper.ctx)
    tic = time.perf_counter()
    if rollout.examples:
        sleep_engine(engine)  # its weight copies go stale at this round's step: scoring and learning run without them
    experience = method.experience(rollout, round_ctx) if rollout.examples else None
    scored = time.perf_counter()
    metrics = {**sampling_metrics, **round_ctx.metrics}
    if experience is not None:
        metrics.update(_learn(cfg, spec, opts, stepper, experience, round_index, pad_id))
    if rollout.examples:
        engine.update_weights(policy)
        trim_freed_memory()  # what the learner and the engine's old copies freed in the heap: back to the OS
    learned = time.perf_counter()
    rewards = rollout.rewards[~rollout.rewards.isnan()]
    total = rollout.generate_seconds + rollout.reward_seconds + (learned - tic)
    return {
        "round": round_index + 1, "rollout_reward": float(rewards.mean()) if len(rewards) else float("nan"),
        **{f"rollout_{k}": v for k, v in (experience.metrics if experience is not None else {}).items()},
        "examples": len(experience.examples) if experience is not None else 0, "generated_tokens": rollout.generated_tokens,
        "time/generate_s": rollout.generate_seconds, "time/reward_s": rollout.reward_seconds,
        "time/score_s": scored - tic, "time/learner_s": learned - scored, "time/cpu_s": time.process_time() - cpu,
        "samples_per_s": rollout.num_samples / total, **metrics,
    }, rollout


def _collect_rollout(cfg: OnlineConfig, engine, policy, tokenizer, prompts: list, reward, round_ctx: RoundContext,
                     round_index: int, ctx) -> tuple[Rollout, dict]:
    """The round's rollout and what users watch in it: the share of groups whose rewards all tie (no signal for a
    group-relative advantage), the sampled tokens' entropy estimate, response length, the share cut short. With
    dynamic sampling (DAPO sec. 3.2) tied groups are dropped and fresh prompts sampled, at most max_refills times,
    until prompts_per_round groups are kept (the surplus is discarded, as verl's recipe does); if the refills run out,
    the round trains on the groups kept."""
    rollout = _sharded_rollout(cfg, engine, policy, tokenizer, prompts, reward, round_ctx, round_index, ctx)
    tied = tied_groups(rollout.rewards)
    metrics = {"zero_std_share": float(tied.float().mean()), **rollout_stats(rollout)}
    if not cfg.dynamic:
        return rollout, metrics
    kept, refills = _untied(rollout, tied), 0
    while kept.rewards.shape[0] < len(prompts) and refills < cfg.max_refills:
        refills += 1
        more = _sharded_rollout(cfg, engine, policy, tokenizer, refill_prompts(round_ctx.prompt_pool, len(prompts),
                                cfg.seed, round_index, refills), reward, round_ctx, round_index, ctx, refills)
        kept = join_rollouts([kept, _untied(more, tied_groups(more.rewards))], sequential=True)
    kept = select_groups(kept, list(range(min(len(prompts), kept.rewards.shape[0]))))
    return kept, {**metrics, "refills": refills, "kept_groups": kept.rewards.shape[0]}


def _untied(rollout: Rollout, tied: torch.Tensor) -> Rollout:
    return select_groups(rollout, (~tied).nonzero().flatten().tolist())


def tied_groups(rewards: torch.Tensor) -> torch.Tensor:
    """[B] bool: groups whose (non-NaN) rewards all tie: a group-relative advantage is 0 for every sample."""
    filled = torch.nan_to_num(rewards, nan=0.0)
    valid = ~rewards.isnan()
    high = torch.where(valid, filled, torch.full_like(filled, -torch.inf)).max(1).values
    low = torch.where(valid, filled, torch.full_like(filled, torch.inf)).min(1).values
    return (high - low <= 0) | (valid.sum(1) < 2)


def rollout_stats(rollout: Rollout) -> dict:
    """Mean response length (tokens), share cut at max_new_tokens, and the entropy of the sampling distribution
    estimated on the sampled tokens: mean -log p(y_t) under the engine (unbiased for the per-token entropy)."""
    lengths = [len(ids) for e in rollout.examples for ids in e.response_ids]
    stats = {"response_length": sum(lengths) / max(len(lengths), 1),
             "truncated_share": float((~rollout.finished).float().mean())}
    if rollout.engine_logps is not None:
        tokens = torch.cat(rollout.engine_logps) if rollout.engine_logps else torch.zeros(0)
        if len(tokens):
            stats["entropy"] = float(-tokens.mean())
    return stats


def refill_prompts(pool: list, count: int, seed: int, round_index: int, refill: int) -> list:
    """Fresh prompts for a dynamic-sampling refill, seeded by the round and the refill (so a resumed run redraws
    the same ones)."""
    rng = random.Random(seed * 1_000_003 + round_index * 101 + refill)
    return [pool[rng.randrange(len(pool))] for _ in range(count)]


def _sharded_rollout(cfg: OnlineConfig, engine, policy, tokenizer, prompts: list, reward, round_ctx: RoundContext,
                     round_index: int, ctx, refill: int = 0) -> Rollout:
    """This rank's contiguous share of the prompts, sampled and scored, then every rank's shares joined in order.
    Each generate call is seeded by its first prompt's place in the round, so the samples are those one process
    draws (when the share is a multiple of sampling.batch_size)."""
    share = len(prompts) // ctx.world_size
    first = ctx.rank * share
    sampling = SamplingConfig.from_options(cfg.sampling, cfg.seed + 10_007 * (round_index + 1) + 7_919 * refill + first)
    rollout_reward = round_ctx.judge_for(policy) if round_ctx.judge_for is not None else reward
    overlong = (cfg.sampling.max_new_tokens, cfg.overlong_cache, cfg.overlong_penalty) if cfg.overlong_cache else None
    local = generate_rollout(engine, tokenizer, prompts[first:first + share], rollout_reward, cfg.num_samples,
                             sampling, cfg.max_length, cfg.missing_eos_penalty, overlong)
    return join_rollouts(gather_objects(local, ctx)) if ctx.enabled else local


def _learn(cfg: OnlineConfig, spec, opts, stepper: Stepper, experience, round_index: int, pad_id: int) -> dict:
    """cfg.epochs passes over the experience, each in cfg.minibatches optimizer steps of the shared step (examples
    shuffled, seeded by the round); a minibatch over max_tokens_per_batch accumulates over micro-batches, which are
    shared out over the ranks. Returns the loss metrics averaged over the round's steps."""
    from alignkit.data.pack import pack, token_budget_batches

    examples, ctx = experience.examples, stepper.ctx
    rng = random.Random(cfg.seed * 1_000_003 + round_index)
    totals: dict[str, float] = {}
    gap = {"sum": 0.0, "tokens": 0.0, "max": 0.0}
    steps = 0
    stepper.train_model.train()
    for _ in range(cfg.epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        for part in (order[i::cfg.minibatches] for i in range(cfg.minibatches)):
            if not part:
                continue
            step_lengths = mean_trained_lengths(examples, part)
            micro = [[part[j] for j in mb] for mb in token_budget_batches([examples[i] for i in part],
                                                                          cfg.max_tokens_per_batch, 0, shuffle=False)]
            local = split_for_ranks(micro, ctx.world_size, stepper.steps_done)[ctx.rank]

            def forward(indices, step_lengths=step_lengths, first=steps == 0):
                batch = pack([examples[i] for i in indices], indices, cfg.max_tokens_per_row, pad_id)
                losses, metrics = compute_losses(stepper.train_model, batch, examples, spec, opts,
                                                 experience.reference, cfg, step_lengths, experience=experience)
                if first and "engine_gap/sum" in metrics:  # before any update: the engine against the trainer
                    gap["sum"] += float(metrics["engine_gap/sum"].sum())
                    gap["tokens"] += float(metrics["engine_gap/tokens"].sum())
                    gap["max"] = max(gap["max"], float(metrics["engine_gap/max"].max()))
                return losses, {k: v for k, v in metrics.items() if not k.startswith("engine_gap/")}, batch.num_tokens

            for key, value in stepper.step(local, len(part), forward).items():
                totals[key] = totals.get(key, 0.0) + value
            steps += 1
    averaged = {key: value / steps for key, value in totals.items() if key not in ("examples", "skipped_steps")}
    if gap["tokens"]:  # mean and max |log pi_engine - log pi_trainer| over the sampled tokens of the first step
        averaged.update({"engine_gap_mean": gap["sum"] / gap["tokens"], "engine_gap_max": gap["max"]})
    return {**averaged, "updates": steps, "skipped_steps": stepper.skipped}


def _append_rollouts(out_dir: Path, round_number: int, rollout: Rollout) -> None:
    """rollouts.jsonl: each round's prompts, sampled texts and rewards (what was trained on, for reading back)."""
    with (out_dir / "rollouts.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps({"step": round_number, "prompts": rollout.prompts, "texts": rollout.texts,
                            "rewards": rollout.rewards.tolist()}) + "\n")


def _judge_factory(cfg: OnlineConfig, tokenizer, judge):
    """model -> the Reward judging that model's samples."""
    if judge is not None:
        return judge if callable(judge) and not hasattr(judge, "score") else (lambda model: judge)
    if cfg.judge != "self":
        from alignkit.rewards.spec import load_reward

        fixed = load_reward(cfg.judge, key="judge")
        return lambda model: fixed
    sampling = SamplingConfig(max_new_tokens=cfg.judge_max_new_tokens, temperature=0.7, top_p=0.9,
                              batch_size=cfg.sampling.batch_size, seed=cfg.seed)
    return lambda model: LLMJudge(model=model, tokenizer=tokenizer, sampling=sampling, num_judgements=cfg.judge_samples)


def _prompt_order(n: int, needed: int, seed: int) -> list[int]:
    """Prompt indices for every round: passes over the prompts, each in a new seeded order."""
    rng, order = random.Random(seed), []
    while len(order) < needed:
        permutation = list(range(n))
        rng.shuffle(permutation)
        order += permutation
    return order[:needed]


def _read_records(path: str) -> list[dict]:
    from alignkit.data.load import load_records

    return load_records(path, shape="prompts")


def _summary(cfg: OnlineConfig, before: dict, after: dict, rows: list[dict]) -> dict:
    def total(key):
        return sum(r.get(key, 0.0) for r in rows)

    seconds = total("time/generate_s") + total("time/reward_s") + total("time/score_s") + total("time/learner_s")
    samples = len(rows) * cfg.prompts_per_round * cfg.num_samples
    return {
        "method": cfg.method, "rounds": cfg.rounds, "samples": samples,
        "reward_start": before["reward"], "reward_final": after["reward"], "reward_gain": after["reward"] - before["reward"] if cfg.evaluate else None,
        "kl_to_start": after.get("kl"), "kl_to_start_sem": after.get("kl_sem"),
        "seconds": seconds, "samples_per_s": samples / seconds if seconds else None,
        "cpu_seconds": total("time/cpu_s"),  # process CPU time (all threads): steadier than wall time when shared
        "time_split": {key: total(f"time/{key}_s") / seconds if seconds else None
                       for key in ("generate", "reward", "score", "learner")},
    }


def run_online_cli(config=None, overrides: dict[str, Any] | None = None) -> OnlineResult:
    cfg = online_config(config, overrides)
    result = run_online(cfg)
    s = result.summary
    if cfg.evaluate:
        log.info("%s: reward %+.4f -> %+.4f (KL to the start %.3f) in %.0f s; wrote %s", cfg.method,
                 s["reward_start"], s["reward_final"], s["kl_to_start"], s["seconds"], result.output_dir)
    return result


__all__ = ["METHODS", "OnlineConfig", "OnlineResult", "command_help", "evaluate_policy", "run_online"]
