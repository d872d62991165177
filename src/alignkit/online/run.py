"""`alignkit online --method grpo|rloo|ppo|online-dpo|self-reward`: rounds of rollout -> experience -> learner.

Each round samples k responses for a batch of prompts with the current policy (rollout.py), scores them with the
reward (or, self-reward, with the policy as judge), turns them into an Experience (experience.py) and runs the learner
(learner.py) with the method's registered loss. The reference is a frozen copy of the starting policy, or of the
policy at the start of every ref_update_every-th round. Writes metrics.jsonl (one line per round, with the time split
between rollout, scoring and learner), final/ (HF format; PPO adds value_head.pt) and summary.json (reward of the
starting and final policy on held-out prompts, and the final policy's KL to the starting one)."""

from __future__ import annotations

import copy
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from alignkit.config import load_config_file, make_config
from alignkit.errors import ConfigError
from alignkit.generate.sample import SamplingConfig, sample
from alignkit.losses import build_options, get_loss
from alignkit.online.advantages import RunningMoments
from alignkit.online.experience import pair_experience, preference_pairs, reference_scores, rl_experience
from alignkit.online.learner import Learner, LearnerConfig, ValueHead
from alignkit.online.rollout import generate_rollout
from alignkit.online.self_reward import LLMJudge, consistency_weights, implicit_reward_agreement
from alignkit.train.logging import MetricsLog
from alignkit.train.loop import save_final, set_seed

log = logging.getLogger("alignkit.online")

METHODS = ("grpo", "rloo", "ppo", "online-dpo", "self-reward")
PAIRWISE = ("online-dpo", "self-reward")


class OnlineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    method: Literal["grpo", "rloo", "ppo", "online-dpo", "self-reward"]
    model: str = Field(description="the starting policy (usually SFT'd): alias, HF hub id or local directory")
    prompts: str = Field(description="prompts JSONL (a `prompt` per row), cycled through in seeded order")
    eval_prompts: str | None = Field(None, description="held-out prompts for summary.json (default: 64 of prompts)")
    reward: str = Field("synthetic", description="reward spec (rewards/spec.py); self-reward reports it only")
    output_dir: str = "runs/online"
    rounds: int = Field(20, gt=0, description="rollout + learner iterations")
    prompts_per_round: int = Field(16, gt=0)
    num_samples: int = Field(4, ge=2, description="samples per prompt (k; GRPO's G)")
    # Sampling (temperature 1, no top-p / top-k: the log-probs trained are of the untempered policy).
    max_new_tokens: int = Field(64, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    generation_batch_size: int = Field(16, gt=0, description="prompts per generate call")
    stop: list[str] = Field(default_factory=list)
    max_length: int = Field(1024, gt=1, description="max tokens of prompt + response when tokenising samples")
    missing_eos_penalty: float | None = Field(None, description="subtracted from the reward of samples cut short")
    # Learner.
    learning_rate: float = Field(1e-6, gt=0)
    value_learning_rate: float | None = Field(None, gt=0, description="ppo: the value head's (default learning_rate)")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    epochs: int = Field(1, gt=0, description="passes over each rollout (PPO epochs / GRPO iterations)")
    minibatches: int = Field(1, gt=0, description="optimizer steps per pass")
    max_tokens_per_batch: int = Field(4096, gt=0)
    max_tokens_per_row: int | None = Field(None, gt=0, description="default: the longest example of a micro-batch")
    chunk_size: int = Field(1024, gt=0)
    precision: Literal["fp32", "bf16"] = "fp32"
    loss: str | None = Field(None, description="online-dpo / self-reward: the pairwise loss (dpo; cream with consistency)")
    loss_options: dict[str, Any] = Field(default_factory=dict, description="options of the method's loss")
    # Reference and pairs.
    pairs: Literal["best-worst", "all"] = Field("best-worst", description="online-dpo / self-reward pairs per prompt")
    ref_update_every: int | None = Field(None, ge=0, description="rounds between reference <- policy; 0: never "
                                         "(default: 1 for self-reward, else 0)")
    apo_alpha: float = Field(0.0, ge=0, description="APO momentum: reference extrapolated from the previous round's")
    # Self-reward.
    judge: str = Field("self", description="self: the policy judges (LLM-as-judge prompt); else a reward spec")
    judge_samples: int = Field(3, gt=0, description="judgements averaged per sample")
    judge_max_new_tokens: int = Field(128, gt=0)
    consistency: Literal["none", "kendall", "toporder"] = Field("none", description="CREAM weights (loss cream)")
    # Report.
    eval_samples: int = Field(4, gt=0, description="samples per held-out prompt for summary.json")
    seed: int = 0
    progress: bool = True

    def sampling(self, seed: int) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, batch_size=self.generation_batch_size, seed=seed, stop=tuple(self.stop))

    def learner(self) -> LearnerConfig:
        return LearnerConfig(self.learning_rate, self.value_learning_rate, self.weight_decay, self.max_grad_norm,
                             self.epochs, self.minibatches, self.max_tokens_per_batch, self.max_tokens_per_row,
                             self.chunk_size, self.precision, self.seed)

    @property
    def reference_every(self) -> int:
        if self.ref_update_every is not None:
            return self.ref_update_every
        return 1 if self.method == "self-reward" else 0


@dataclass
class OnlineResult:
    model: object
    tokenizer: object
    summary: dict
    rounds: list[dict]  # the metrics of every round, as in metrics.jsonl
    output_dir: Path
    value_head: torch.nn.Module | None = None


def method_loss(cfg: OnlineConfig):
    """(LossSpec, options) of the method: grpo / rloo / ppo train with their own loss; online-dpo and self-reward with
    a pairwise loss on sequence log-probs (default dpo, cream when consistency weights are on)."""
    if cfg.method in PAIRWISE:
        name = cfg.loss or ("cream" if cfg.consistency != "none" else "dpo")
        spec = get_loss(name)
        if spec.data_shape != "pairs" or spec.output != "logps" or spec.needs_token_logps:
            raise ConfigError("loss", f"{cfg.method} trains with a pairwise loss on sequence log-probs (dpo, ipo, cream, "
                              f"...), not '{name}'")
        if cfg.consistency != "none" and name != "cream":
            raise ConfigError("consistency", f"consistency weights are read by the cream loss only, not '{name}'")
    else:
        name = cfg.method
        if cfg.loss not in (None, name):
            raise ConfigError("loss", f"method {cfg.method} trains with its own loss '{name}'; leave loss unset")
        spec = get_loss(name)
    if (cfg.apo_alpha > 0 or cfg.consistency != "none") and cfg.reference_every == 0:
        raise ConfigError("ref_update_every", "apo_alpha and consistency compare consecutive rounds' models: set >= 1")
    if cfg.method != "self-reward" and cfg.consistency != "none":
        raise ConfigError("consistency", "CREAM consistency applies to method self-reward")
    return spec, build_options(spec, cfg.loss_options)


def frozen_copy(model):
    copied = copy.deepcopy(model).eval()
    copied.requires_grad_(False)
    return copied


def evaluate_policy(model, tokenizer, prompts: list, reward, sampling: SamplingConfig, num_samples: int,
                    reference=None, max_length: int = 1024) -> dict:
    """Mean reward of num_samples samples per prompt and, given a reference, the KL estimate mean_y log pi(y)/pi_ref(y)
    on those samples (eval/kl.py: unbiased at temperature 1)."""
    from alignkit.eval.kl import kl_summary, sequence_log_ratios

    texts = sample(model, tokenizer, prompts, sampling, num_samples)
    flat_prompts = [p for p, group in zip(prompts, texts) for _ in group]
    flat_texts = [t for group in texts for t in group]
    rewards = reward(flat_prompts, flat_texts)
    result = {"reward": sum(rewards) / len(rewards), "samples": len(rewards)}
    if reference is not None:
        summary = kl_summary(sequence_log_ratios(model, reference, tokenizer, flat_prompts, flat_texts, max_length))
        result.update(kl=summary["kl"], kl_sem=summary["kl_sem"])
    return result


class _Snapshots:
    """The reference (and the previous round's reference, for APO and CREAM) as frozen copies of the policy."""

    def __init__(self, model, every: int, keep_previous: bool):
        self.reference = frozen_copy(model)
        self.initial = frozen_copy(model) if every else self.reference
        self.previous = frozen_copy(model) if every and keep_previous else None
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


def run_online(cfg: OnlineConfig, model=None, tokenizer=None, *, prompts: list | None = None,
               eval_prompts: list | None = None, reward=None, judge=None) -> OnlineResult:
    """Run cfg.rounds rounds. model/tokenizer: the starting policy (default: load cfg.model); prompts / eval_prompts:
    lists (default: read cfg.prompts / cfg.eval_prompts); reward: a Reward (default: cfg.reward); judge (self-reward):
    a Reward, or a function model -> Reward, standing in for the LLM judge (default: cfg.judge)."""
    set_seed(cfg.seed)
    spec, opts = method_loss(cfg)
    prompts = prompts if prompts is not None else _read_prompts(cfg.prompts)
    if eval_prompts is None:
        eval_prompts = _read_prompts(cfg.eval_prompts) if cfg.eval_prompts else random.Random(cfg.seed).sample(
            prompts, min(64, len(prompts)))
    if reward is None:
        from alignkit.rewards.spec import load_reward

        reward = load_reward(cfg.reward)
    if model is None:
        from alignkit.models.resolve import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(cfg.model)
    judge_for = _judge_factory(cfg, tokenizer, judge) if cfg.method == "self-reward" else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    value_head = ValueHead(model.get_output_embeddings().weight.shape[1]) if cfg.method == "ppo" else None
    learner = Learner(model, cfg.learner(), pad_id, value_head)
    snapshots = _Snapshots(model, cfg.reference_every, keep_previous=cfg.apo_alpha > 0 or cfg.method == "self-reward")
    moments = RunningMoments()
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(cfg.model_dump(), indent=2))
    eval_sampling = cfg.sampling(cfg.seed + 999_983)
    before = evaluate_policy(model, tokenizer, eval_prompts, reward, eval_sampling, cfg.eval_samples)
    order = _prompt_order(len(prompts), cfg.rounds * cfg.prompts_per_round, cfg.seed)
    logger = MetricsLog(out_dir, cfg.rounds, 0, cfg.progress)
    rows = []
    try:
        for round_index in range(cfg.rounds):
            snapshots.start_round(round_index, model)
            batch = order[round_index * cfg.prompts_per_round:(round_index + 1) * cfg.prompts_per_round]
            row = _round(cfg, spec, opts, model, tokenizer, [prompts[i] for i in batch], reward, judge_for, learner,
                         snapshots, moments, round_index)
            rows.append(row)
            logger.write(round_index + 1, row)
    finally:
        logger.close()
    after = evaluate_policy(model, tokenizer, eval_prompts, reward, eval_sampling, cfg.eval_samples, snapshots.initial,
                            cfg.max_length)
    summary = _summary(cfg, before, after, rows)
    save_final(model, tokenizer, out_dir / "final")
    if value_head is not None:
        torch.save(value_head.state_dict(), out_dir / "final" / "value_head.pt")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return OnlineResult(model, tokenizer, summary, rows, out_dir, value_head)


def _round(cfg: OnlineConfig, spec, opts, model, tokenizer, prompts: list, reward, judge_for, learner: Learner,
           snapshots: _Snapshots, moments: RunningMoments, round_index: int) -> dict:
    """One rollout -> experience -> learner round; its metrics, with the seconds each part took."""
    sampling = cfg.sampling(cfg.seed + 10_007 * (round_index + 1))
    cpu = time.process_time()
    rollout_reward = judge_for(model) if judge_for is not None else reward
    rollout = generate_rollout(model, tokenizer, prompts, rollout_reward, cfg.num_samples, sampling, cfg.max_length,
                               cfg.missing_eos_penalty)
    tic = time.perf_counter()
    metrics: dict[str, float] = {}
    if cfg.method in PAIRWISE:
        experience = _pair_round(cfg, rollout, learner, snapshots, judge_for, metrics)
    else:
        experience = rl_experience(rollout, learner, snapshots.reference, cfg.method, opts, moments)
    scored = time.perf_counter()
    if experience.examples:
        metrics.update(learner.update(experience, spec, opts))
    learned = time.perf_counter()
    rewards = rollout.rewards[~rollout.rewards.isnan()]
    total = rollout.generate_seconds + rollout.reward_seconds + (learned - tic)
    return {
        "round": round_index + 1, "rollout_reward": float(rewards.mean()) if len(rewards) else float("nan"),
        **{f"rollout_{k}": v for k, v in experience.metrics.items()},
        "examples": len(experience.examples), "generated_tokens": rollout.generated_tokens,
        "time/generate_s": rollout.generate_seconds, "time/reward_s": rollout.reward_seconds,
        "time/score_s": scored - tic, "time/learner_s": learned - scored, "time/cpu_s": time.process_time() - cpu,
        "samples_per_s": rollout.num_samples / total,
        **metrics,
    }


def _pair_round(cfg: OnlineConfig, rollout, learner: Learner, snapshots: _Snapshots, judge_for, metrics: dict):
    """Online DPO / self-reward: pairs of the rollout's samples, the reference's log-probs (APO-extrapolated if set),
    CREAM weights from the previous round's judge, and the implicit reward's agreement with the judge."""
    triples = preference_pairs(rollout.rewards, cfg.pairs)
    ref_seq, _ = reference_scores(snapshots.reference, rollout.examples, learner)
    previous = snapshots.last
    previous_seq = reference_scores(previous, rollout.examples, learner)[0] if previous is not None else None
    consistency = None
    if cfg.consistency != "none" and previous is not None:
        flat_prompts = [p for p, group in zip(rollout.prompts, rollout.texts) for _ in group]
        flat_texts = [t for group in rollout.texts for t in group]
        earlier = torch.tensor(judge_for(previous)(flat_prompts, flat_texts), dtype=torch.float32)
        consistency = consistency_weights(rollout.rewards, earlier.view_as(rollout.rewards), cfg.consistency)
        metrics["consistency"] = float(consistency.mean())
    if previous_seq is not None and cfg.method == "self-reward":
        # The implicit reward of the policy at this round's start (the reference) against its own reference.
        metrics["implicit_judge_agreement"] = implicit_reward_agreement(ref_seq - previous_seq, triples)
    metrics["pairs"] = len(triples)
    return pair_experience(rollout, triples, ref_seq, previous_seq, cfg.apo_alpha, consistency)


def _judge_factory(cfg: OnlineConfig, tokenizer, judge):
    """model -> the Reward judging that model's samples."""
    if judge is not None:
        return judge if callable(judge) and not hasattr(judge, "score") else (lambda model: judge)
    if cfg.judge != "self":
        from alignkit.rewards.spec import load_reward

        fixed = load_reward(cfg.judge, key="judge")
        return lambda model: fixed
    sampling = SamplingConfig(max_new_tokens=cfg.judge_max_new_tokens, temperature=0.7, top_p=0.9,
                              batch_size=cfg.generation_batch_size, seed=cfg.seed)
    return lambda model: LLMJudge(model=model, tokenizer=tokenizer, sampling=sampling, num_judgements=cfg.judge_samples)


def _prompt_order(n: int, needed: int, seed: int) -> list[int]:
    """Prompt indices for every round: passes over the prompts, each in a new seeded order."""
    rng, order = random.Random(seed), []
    while len(order) < needed:
        permutation = list(range(n))
        rng.shuffle(permutation)
        order += permutation
    return order[:needed]


def _read_prompts(path: str) -> list:
    from alignkit.data.load import load_records

    return [r["prompt"] for r in load_records(path, shape="prompts")]


def _summary(cfg: OnlineConfig, before: dict, after: dict, rows: list[dict]) -> dict:
    def total(key):
        return sum(r.get(key, 0.0) for r in rows)

    seconds = total("time/generate_s") + total("time/reward_s") + total("time/score_s") + total("time/learner_s")
    samples = cfg.rounds * cfg.prompts_per_round * cfg.num_samples
    return {
        "method": cfg.method, "rounds": cfg.rounds, "samples": samples,
        "reward_start": before["reward"], "reward_final": after["reward"], "reward_gain": after["reward"] - before["reward"],
        "kl_to_start": after.get("kl"), "kl_to_start_sem": after.get("kl_sem"),
        "seconds": seconds, "samples_per_s": samples / seconds if seconds else None,
        "cpu_seconds": total("time/cpu_s"),  # process CPU time (all threads): steadier than wall time when shared
        "time_split": {key: total(f"time/{key}_s") / seconds if seconds else None
                       for key in ("generate", "reward", "score", "learner")},
    }


def run_online_cli(config=None, overrides: dict[str, Any] | None = None) -> OnlineResult:
    values = load_config_file(config) if config else {}
    values.update(overrides or {})
    cfg = make_config(values, OnlineConfig)
    result = run_online(cfg)
    s = result.summary
    log.info("%s: reward %+.4f -> %+.4f (KL to the start %.3f) in %.0f s; wrote %s", cfg.method, s["reward_start"],
             s["reward_final"], s["kl_to_start"], s["seconds"], result.output_dir)
    return result


def command_help() -> str:
    lines = ["alignkit online --method grpo|rloo|ppo|online-dpo|self-reward [--config cfg.yaml] [--key value ...]", "",
             "keys:"]
    for name, field in OnlineConfig.model_fields.items():
        default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
        lines.append(f"  --{name:<22} {default:<14} {field.description or ''}")
    lines += ["", "loss_options: those of the method's loss (`alignkit grpo --help`, rloo, ppo, dpo, cream)."]
    return "\n".join(lines)
