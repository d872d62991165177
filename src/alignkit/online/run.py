"""`alignkit online --method grpo|rloo|ppo|online-dpo|self-reward`: rounds of rollout -> experience -> the shared step.

Each round samples k responses for a batch of prompts with the current policy (online/sampling.py: under torchrun
each rank samples its share and the ranks exchange the results), scores them with the reward (self-reward: with
the policy as judge), turns them into an Experience with the method's builder (ONLINE_METHODS) and trains on it with
the step offline training uses. The run's lifecycle (resume, the metrics log, checkpoints, the final save) is
train/run.Run's. The reference is a frozen copy of the starting policy (LoRA: the policy with its adapters off), or
moves to the policy every ref_update_every rounds (train/ref_update.MovingReference). Writes metrics.jsonl,
rollouts.jsonl, final/ (PPO adds value_head.safetensors) and summary.json (online/summary.py)."""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from alignkit.data.load import load_records
from alignkit.errors import ConfigError
from alignkit.generate.engines import make_engine, sleep_engine
from alignkit.losses.base import needs
from alignkit.losses.offpolicy import resolve_correction
from alignkit.models.inference import frozen_copy
from alignkit.models.teacher import load_own_teacher, load_teacher
from alignkit.models.value_head import PolicyWithValueHead
from alignkit.online import mixing, partial, sampling
from alignkit.online.advantages import RunningMoments
from alignkit.online.config import OnlineConfig, command_help, method_loss, online_config
from alignkit.online.env_rollout import EnvironmentSetup
from alignkit.online.experience import RoundContext, Scorer
from alignkit.online.learner import learn
from alignkit.online.methods import ONLINE_METHODS
from alignkit.online.producer import INFLIGHT_FILE, RolloutProducer, version_metrics
from alignkit.online.ray_learners import run_learner_group
from alignkit.online.ray_rollouts import RolloutCluster, rollout_engine
from alignkit.online.rollout import Rollout, RolloutShape, stamp_version
from alignkit.online.self_reward import judge_factory
from alignkit.online.sharding import check_sharded_engine, check_sharded_setup
from alignkit.online.summary import append_rollouts, sample_kl, summarize
from alignkit.train.distributed import init_distributed, is_sharded, shutdown, side_group
from alignkit.train.memory import trim_freed_memory
from alignkit.train.method import Method
from alignkit.train.packing import Packing
from alignkit.train.ref_update import MovingReference
from alignkit.train.run import Run, set_seed

log = logging.getLogger("alignkit.online")

METHODS = tuple(ONLINE_METHODS)
VALUE_HEAD_FILE = "value_head/model.safetensors"  # in a checkpoint, beside the policy's *.safetensors


@dataclass
class OnlineInputs:
    """What a caller may hand over in memory instead of the config's: prompts / eval_prompts (lists; default: read
    cfg.prompts / cfg.eval_prompts, else 64 of prompts), reward (a Reward; default: cfg.reward), judge (self-reward:
    a Reward, or a function model -> Reward, standing in for the LLM judge; default: cfg.judge), completions (GKD's
    dataset rounds: each prompt's TokenizedExample; default: the completions of cfg.prompts' records)."""

    prompts: list | None = None
    eval_prompts: list | None = None
    reward: object = None
    judge: object = None
    completions: list | None = None


@dataclass
class OnlineResult:
    model: object
    tokenizer: object
    summary: dict
    rounds: list[dict]  # the metrics of every round, as in metrics.jsonl
    output_dir: Path
    value_head: torch.nn.Module | None = None


def run_online(cfg: OnlineConfig, model=None, tokenizer=None, inputs: OnlineInputs | None = None) -> OnlineResult:
    """Run cfg.rounds rounds from `model`/`tokenizer` (default: load cfg.model). Under torchrun every rank runs
    this; the result equals one process on the same rollouts."""
    ctx = init_distributed()
    try:
        if cfg.ray is not None and cfg.ray.learners > 1 and not ctx.enabled:  # the ranks as Ray actors
            return run_learner_group(cfg, (model, tokenizer), inputs or OnlineInputs())
        with RolloutCluster.open(cfg, ctx) as cluster:  # Ray rollout workers (cfg.ray), else None
            return OnlineRun(cfg, ctx, (model, tokenizer), inputs or OnlineInputs(), cluster).train()
    finally:
        shutdown(ctx)


def check_online_setup(cfg: OnlineConfig, ctx) -> None:
    """What an online run cannot do, said before anything is loaded."""
    if ctx.enabled and cfg.prompts_per_round % ctx.world_size:
        raise ConfigError("prompts_per_round", f"must be a multiple of the {ctx.world_size} processes: each samples "
                                               "an equal share of a round's prompts")
    if ctx.enabled and cfg.distributed == "fsdp":
        check_sharded_setup(cfg)
    if cfg.sampling.temperature <= 0:
        raise ConfigError("sampling.temperature", "online runs sample at a temperature > 0: greedy samples have no "
                          "distribution the learner could score (TRL refuses it too), and a prompt's k samples tie")
    if cfg.neftune_alpha > 0:
        raise ConfigError("neftune_alpha", "noise on the learner's inputs would make the log-probs it trains differ "
                                           "from those the samples were drawn and scored with; online runs take 0")


def resolve_inputs(cfg: OnlineConfig, given: OnlineInputs) -> OnlineInputs:
    """The prompts, held-out prompts and reward of the run: given, else from the config."""
    records = load_records(cfg.prompts, shape="prompts") if given.prompts is None else []
    # With an environment the whole record is the prompt: the environment reads its fields at reset.
    prompts_of = (lambda rs: list(rs)) if cfg.environment is not None else (lambda rs: [r["prompt"] for r in rs])
    prompts = given.prompts if given.prompts is not None else prompts_of(records)
    eval_prompts = given.eval_prompts
    if eval_prompts is None and cfg.eval_prompts:
        eval_records = load_records(cfg.eval_prompts, shape="prompts")
        records, eval_prompts = records + eval_records, prompts_of(eval_records)
    if eval_prompts is None:
        eval_prompts = random.Random(cfg.seed).sample(prompts, min(64, len(prompts)))
    reward = given.reward
    if reward is None:
        from alignkit.rewards.spec import load_reward
        from alignkit.rewards.verifiable.records import bind_records

        reward = bind_records(load_reward(cfg.reward), records)  # rewards that read a record field get theirs
    return OnlineInputs(prompts, eval_prompts, reward, given.judge, given.completions)


def online_teacher(cfg: OnlineConfig, spec, model, tokenizer, ctx) -> tuple:
    """(distillation's frozen teacher, the tokenizer of its tokenisation: uld only), (None, None) for other methods;
    loaded and checked against the student; a whole copy on every rank (GKD's divergence is taken inside the
    learner's forward, which DDP and FSDP2 wrap)."""
    if not spec.needs_teacher:
        return None, None
    if cfg.teacher_tokenizer == "own":  # uld: any vocabulary; each round's samples are re-tokenised for it
        teacher, own = load_own_teacher(cfg.teacher, cfg.precision, cfg.attention)
    else:
        teacher, own = load_teacher(cfg.teacher, model, tokenizer, cfg.precision, attention=cfg.attention), tokenizer
    return teacher.to(ctx.device) if ctx.device is not None else teacher, own if cfg.method == "uld" else None


def engine_corrected(opts, engine, stale: bool = False):
    """The loss options with engine_correction `auto` made concrete for the run's engine (losses/offpolicy.py);
    stale: async rollouts, whose engine samples with older weights than the learner's."""
    name = getattr(engine, "name", type(engine).__name__)
    if stale and name == "hf":
        raise ConfigError("sampling.engine", "async rollouts sample while the learner trains; the hf engine (auto's "
                                             "choice for this model) samples from the training model itself: use "
                                             "fast or vllm, or async.max_staleness 0")
    resolved = resolve_correction(opts, getattr(engine, "exact_logprobs", False), stale)
    if resolved is not opts:
        log.info("engine_correction auto: %s (the %s engine's log-probs %s the trainer's)", resolved.engine_correction,
                 name, "are stale policies', not" if stale else
                 "are" if resolved.engine_correction == "none" else "differ from")
    return resolved


def online_references(model, cfg: OnlineConfig, self_judge: bool = False, read: bool = True):
    """(the reference, the starting policy for the summary's KL): frozen copies of `model` (bf16 linear weights in
    a bf16 run: the same log-probs under autocast); the reference moves every ref_update_every rounds, keeping the
    one it replaced where APO or a self-judge (CREAM) compares consecutive rounds. Under LoRA (None, None): the
    reference is the base, the policy with its adapters off. (None, None) too where nothing reads them (`read`
    false: no KL term, no pairs, no moving reference, and eval_before_after false): no copy is held."""
    if cfg.lora is not None or not (read or cfg.eval_before_after or cfg.reference_every):
        return None, None
    keep = bool(cfg.reference_every) and (cfg.apo_alpha > 0 or self_judge)
    reference = MovingReference(model, cfg.reference_every, keep_previous=keep, precision=cfg.precision)
    return reference, frozen_copy(model, cfg.precision) if cfg.reference_every else reference.reference


class OnlineRun:
    """One online run: its config, method, lifecycle (train/run.Run), engine, policy (and the module trained: with
    PPO's value head), reward and references. Built in the order that fixes its random draws; `train` runs the
    rounds."""

    def __init__(self, cfg: OnlineConfig, ctx, model_and_tokenizer: tuple, given: OnlineInputs, cluster=None):
        set_seed(cfg.seed)
        self.cfg, self.method = cfg, ONLINE_METHODS[cfg.method]
        spec, opts = method_loss(cfg)
        check_online_setup(cfg, ctx)
        inputs = resolve_inputs(cfg, given)
        self.prompts, self.eval_prompts, self.reward = inputs.prompts, inputs.eval_prompts, inputs.reward
        self.environments = EnvironmentSetup.from_config(cfg, self.reward)  # None: single-turn rollouts
        model, tokenizer = model_and_tokenizer
        if model is None:
            from alignkit.models.resolve import load_model_and_tokenizer

            model, tokenizer = load_model_and_tokenizer(cfg.model)
        check_sharded_engine(cfg, model, ctx)
        self.teacher, teacher_tokens = online_teacher(cfg, spec, model, tokenizer, ctx)  # refused before writing
        self.completions = mixing.dataset_examples(cfg, tokenizer, self.prompts, None if given.prompts is not None
                                                   else cfg.prompts, inputs.completions)  # GKD's dataset rounds
        cache = mixing.open_teacher_cache(cfg, self.teacher, opts, self.completions)  # their teacher top-k on disk
        self.tokenizer, self.run = tokenizer, Run(cfg, ctx, tokenizer)
        self.run.open()  # a resume is checked before anything is written
        self.judge_for = judge_factory(cfg, tokenizer, inputs.judge) if self.method.self_judge else None
        # rows: max_tokens_per_row, else the longest example
        # the learner, the behaviour scorer and the reference score at the sampling temperature (TRL: logits / T):
        # the learner reads chunk size and temperature from the same packing as the scorers
        self.packing = replace(Packing.from_config(cfg, tokenizer), temperature=cfg.sampling.temperature)
        self.completions = mixing.with_teacher_topk(cache, self.completions, self.teacher, opts, self.packing, ctx)
        self.loss = Method(spec, opts, self.packing.chunk_size, temperature=self.packing.temperature,
                           teacher=self.teacher if "teacher" in needs(opts) else None, teacher_tokenizer=teacher_tokens)
        if ctx.device is not None:
            model.to(ctx.device)  # before the reference copies are made
        read = "reference" in needs(opts) or self.method.pairs or self.method.self_judge
        self.references, self.initial = online_references(model, cfg, self.method.self_judge, read)
        self.policy = self.run.prepare(model)  # device, attention, gradient checkpointing, LoRA
        self.trained = PolicyWithValueHead(self.policy) if self.method.value_head else self.policy
        groups = self.trained.parameter_groups(cfg.value_learning_rate) if self.method.value_head else None
        self.run.resume(cfg.rounds * cfg.updates_per_round, self.trained, groups)
        self.engine = rollout_engine(self.policy, tokenizer, cfg.sampling, cluster)  # new weights every round
        self.staleness = cfg.async_rollouts.max_staleness if cfg.async_rollouts is not None else None
        self.loss = replace(self.loss, opts=engine_corrected(self.loss.opts, self.engine, bool(self.staleness)))
        # GKD's seq_kd rounds: the teacher samples (its engine keeps its weights)
        self.teacher_engine = make_engine(self.teacher, tokenizer, cfg.sampling) if cfg.lmbda < 1 and cfg.seq_kd \
            else None
        self.moments = RunningMoments()  # PPO's reward normalisation (a checkpoint's, on resume)
        self.before = self._restore()
        self.run.open_log(cfg.rounds, "rollouts.jsonl")
        self.order = sampling.prompt_order(len(self.prompts), cfg.rounds * cfg.prompts_per_round, cfg.seed)
        # FSDP2: the scorers call the sharded module, which gathers each layer as it runs (every rank scores the
        # whole rollout, so all take part in every forward)
        scored = self.run.train_model if is_sharded(self.run.train_model) else self.trained
        self.scorer = Scorer(scored, self.policy, self.packing)
        # async: the producer thread exchanges the ranks' shares on a group of its own (the learner's is busy)
        self.rollout_group = side_group(ctx) if self.staleness is not None else None
        self.segments = self.staleness if cfg.async_rollouts is not None and cfg.async_rollouts.partial else 1
        self.producer = None if self.staleness is None else RolloutProducer(
            self.collect_segment, cfg.rounds, self.staleness, self._saved_inflight(), self.segments)

    def _saved_inflight(self) -> dict | None:
        """The rounds a checkpoint had sampled ahead of the learner (async), trained as they were sampled."""
        path = self.run.resumed.path / INFLIGHT_FILE if self.run.resumed is not None else None
        saved = torch.load(path, weights_only=False) if path is not None and path.exists() else None
        return RolloutProducer.restored(saved, self.run.ctx)

    def source(self, round_index: int) -> str:
        """GKD's seeded draw of the round's responses (online/mixing.py): student, teacher or dataset."""
        return mixing.round_source(self.cfg.seed, round_index, self.cfg.lmbda, self.cfg.seq_kd)

    def engine_for(self, round_index: int):
        """The engine that samples the round: the policy's, or in GKD's seq_kd rounds the teacher's."""
        return self.teacher_engine if self.source(round_index) == "teacher" else self.engine

    def _restore(self) -> dict:
        """What a checkpoint adds to the run's (moments, value head, references); the held-out reward at the start,
        saved in it or measured now."""
        saved, cfg = self.run.saved, self.cfg
        if self.run.resumed is None:
            return self.evaluate(final=False) if cfg.eval_before_after else {"reward": None}
        self.moments = RunningMoments(**saved["moments"])
        if self.method.value_head:
            load_model(self.trained.value_head, str(self.run.resumed.path / VALUE_HEAD_FILE))
        if self.references is not None:
            self.references.restore(self.run.resumed.path, saved["has_previous"])
        return saved["before"]

    def evaluate(self, final: bool) -> dict:
        """The held-out reward (the engine samples with the policy's weights); final: with the KL to the start."""
        cfg = self.cfg
        # The starting evaluation has always cut samples at 1024 tokens, not max_length: kept, so summaries compare.
        shape = RolloutShape(cfg.eval_samples, cfg.max_length if final else 1024, seed=cfg.seed + 999_983)
        result, rollout = sampling.evaluate_policy(self.engine, self.tokenizer, self.eval_prompts,
                                                   self.environments or self.reward, cfg.sampling, shape)
        if final:
            policy = self.run.train_model if is_sharded(self.run.train_model) else self.policy
            result.update(sample_kl(policy, self.initial, rollout, self.packing))
        return result

    def train(self) -> OnlineResult:
        cfg, run = self.cfg, self.run
        rows = []
        try:
            for round_index in range(run.start, cfg.rounds):  # async: the producer samples ahead meanwhile
                row, rollout = self.round(round_index)
                rows.append(row)
                done = round_index + 1
                run.write(done, row, force=done == cfg.rounds)
                if run.log is not None:
                    append_rollouts(run.out_dir, done, rollout)
                if done < cfg.rounds and cfg.save_every and done % cfg.save_every == 0:
                    self.save(done)
        finally:
            if self.producer is not None:
                self.producer.close()
            run.close_log()
        return self.finish(rows)

    def round(self, round_index: int) -> tuple[dict, Rollout]:
        """One rollout -> experience -> shared-step round; its metrics, with the seconds each part took. The engine
        gets the new weights once the round's optimizer steps are done (it samples only between rounds)."""
        cfg = self.cfg
        if self.references is not None:
            self.references.follow(round_index, self.policy)
        round_ctx = RoundContext(cfg, self.loss.opts, self.scorer, self.references, self.moments, self.judge_for,
                                 self.prompts, teacher=self.teacher, tokenizers=(self.tokenizer, self.loss.teacher_tokenizer))
        cpu = time.process_time()
        rollout, metrics = self.sample(round_index)
        tic = time.perf_counter()
        if rollout.examples and not self.staleness:  # async: the engine samples the next round meanwhile
            sleep_engine(self.engine)  # its weights go stale at this round's step: scoring and learning run without them
        experience = self.method.experience(rollout, round_ctx) if rollout.examples else None
        scored = time.perf_counter()
        metrics.update(round_ctx.metrics)
        if experience is not None:
            metrics.update(self.learn(experience, round_index))
        if rollout.examples:
            if self.producer is not None:
                self.producer.drain()  # the rounds the current weights sample are done before the weights change
            self.engine.update_weights(self.policy)
            trim_freed_memory()  # what the learner and the engine's old copies freed in the heap: back to the OS
        learned = time.perf_counter()
        total = rollout.generate_seconds + rollout.reward_seconds + (learned - tic)
        return {
            "round": round_index + 1, "rollout_reward": sampling.mean_reward(rollout),
            **{f"rollout_{k}": v for k, v in (experience.metrics if experience is not None else {}).items()},
            "examples": len(experience.examples) if experience is not None else 0,
            "generated_tokens": rollout.generated_tokens, "time/generate_s": rollout.generate_seconds,
            "time/reward_s": rollout.reward_seconds, "time/score_s": scored - tic, "time/learner_s": learned - scored,
            "time/cpu_s": time.process_time() - cpu, "samples_per_s": rollout.num_samples / total, **metrics,
        }, rollout

    def collect(self, round_index: int) -> tuple[Rollout, dict]:
        """Round `round_index`'s prompts sampled with the engine's weights and scored (async: on the producer's
        thread), or in GKD's dataset rounds their records' completions; teacher-sampled rounds keep no engine
        log-probs (no engine/trainer gap to measure)."""
        start, source = round_index * self.cfg.prompts_per_round, self.source(round_index)
        rows = self.order[start:start + self.cfg.prompts_per_round]
        batch = [self.prompts[i] for i in rows]
        if source == "dataset":
            rollout = mixing.dataset_rollout([self.completions[i] for i in rows], batch, self.reward, self.tokenizer)
            metrics = sampling.rollout_stats(rollout)
        else:
            rollout, metrics = sampling.collect_rollout(self, batch, round_index)
        if self.cfg.lmbda < 1:
            metrics.update(mixing.source_metrics(source))
            rollout.engine_logps = rollout.engine_logps if source == "student" else None
        return rollout, metrics

    def collect_segment(self, round_index: int, segment: int, state):
        """The producer's job: a whole round (collect), or with partial rollouts its next segment (online/partial)."""
        if self.segments == 1:
            return self.collect(round_index)
        return partial.collect_segment(self, round_index, segment, state)

    def sample(self, round_index: int) -> tuple[Rollout, dict]:
        """The round's rollout, each token stamped with the weight version that sampled it: this round's
        (synchronous), or from the producer, sampled max_staleness versions back at most (async: with the version,
        its staleness and the seconds the learner waited for it)."""
        if self.producer is None:
            rollout, metrics = self.collect(round_index)
            return stamp_version(rollout, round_index), metrics
        tic = time.perf_counter()
        self.producer.start(round_index)  # the weights are version round_index now
        rollout, metrics = self.producer.take(round_index)
        return rollout, {**metrics, **version_metrics(rollout, round_index), "time/wait_s": time.perf_counter() - tic}

    def learn(self, experience, round_index: int) -> dict:
        return learn(self.run.stepper, self.loss, self.packing, experience, self.cfg, round_index)

    def save(self, done: int) -> None:
        extra = self.references.checkpoint_models() if self.references is not None else {}
        if self.method.value_head:
            extra[VALUE_HEAD_FILE] = self.trained.value_head
        if self.producer is not None:
            extra[INFLIGHT_FILE] = self.producer.checkpoint(self.run.ctx)
        self.run.save(done, {"before": self.before, "moments": asdict(self.moments),
                             "has_previous": self.references is not None and self.references.has_previous}, extra)

    def finish(self, rows: list[dict]) -> OnlineResult:
        cfg, run = self.cfg, self.run
        after = self.evaluate(final=True) if cfg.eval_before_after else {"reward": None}
        summary = summarize(cfg, self.before, after, rows)
        policy = run.finish({**(rows[-1] if rows else {}), **summary}, run.stepper.steps_done)
        value_head = self.trained.value_head if self.method.value_head else None
        if run.ctx.is_main:
            if value_head is not None:
                save_model(value_head, str(run.out_dir / "final" / "value_head.safetensors"))
            (run.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return OnlineResult(policy, self.tokenizer, summary, rows, run.out_dir, value_head)


def run_online_cli(config=None, overrides: dict[str, Any] | None = None) -> OnlineResult:
    cfg = online_config(config, overrides)
    result = run_online(cfg)
    s = result.summary
    if cfg.eval_before_after:
        log.info("%s: reward %+.4f -> %+.4f (KL to the start %.3f) in %.0f s; wrote %s", cfg.method,
                 s["reward_start"], s["reward_final"], s["kl_to_start"], s["seconds"], result.output_dir)
    return result


__all__ = ["METHODS", "OnlineConfig", "OnlineInputs", "OnlineResult", "command_help", "run_online"]
