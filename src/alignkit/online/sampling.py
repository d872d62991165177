"""What a round samples: its rollout, each rank sampling its share of the prompts, and dynamic sampling (DAPO sec.
3.2), which drops the groups whose rewards all tie and refills the round with fresh prompts; what users watch in
a rollout (rollout_stats); and the held-out evaluation's samples."""

from __future__ import annotations

import random

import torch

from alignkit.config import SamplingOptions
from alignkit.online.env_rollout import EnvironmentSetup, environment_rollout
from alignkit.online.rollout import (
    Rollout,
    RolloutShape,
    generate_rollout,
    join_rollouts,
    select_groups,
    training_examples,
)
from alignkit.train.distributed import gather_objects


def tied_groups(rewards: torch.Tensor) -> torch.Tensor:
    """[B] bool: groups whose (non-NaN) rewards all tie: a group-relative advantage is 0 for every sample."""
    filled = torch.nan_to_num(rewards, nan=0.0)
    valid = ~rewards.isnan()
    high = torch.where(valid, filled, torch.full_like(filled, -torch.inf)).max(1).values
    low = torch.where(valid, filled, torch.full_like(filled, torch.inf)).min(1).values
    return (high - low <= 0) | (valid.sum(1) < 2)


def untied(rollout: Rollout, tied: torch.Tensor) -> Rollout:
    return select_groups(rollout, (~tied).nonzero().flatten().tolist())


def rollout_stats(rollout: Rollout) -> dict:
    """Mean response length (tokens), share cut at max_new_tokens, and the entropy of the sampling distribution
    estimated on the sampled tokens: mean -log p(y_t) under the engine (unbiased for the per-token entropy)."""
    lengths = [len(ids) for e in rollout.examples for ids in e.response_ids]
    stats = {"response_length": sum(lengths) / max(len(lengths), 1),
             "truncated_share": float((~rollout.finished).float().mean())}
    engine_logps = training_examples(rollout)[1]  # with the later segments of forked conversations
    if engine_logps is not None:
        tokens = torch.cat(engine_logps) if engine_logps else torch.zeros(0)
        if len(tokens):
            stats["entropy"] = float(-tokens.mean())
    return stats


def student_samples(seed: int, round_index: int, lmbda: float) -> bool:
    """GKD's coin for one round: the student samples it with probability lmbda, else the teacher does (seq_kd);
    seeded by the round, so a resumed run draws the same."""
    return lmbda >= 1 or random.Random(seed * 1_000_003 + 7 * round_index + 3).random() < lmbda


def refill_prompts(pool: list, count: int, seed: int, round_index: int, refill: int) -> list:
    """Fresh prompts for a dynamic-sampling refill, seeded by the round and the refill (so a resumed run redraws
    the same ones)."""
    rng = random.Random(seed * 1_000_003 + round_index * 101 + refill)
    return [pool[rng.randrange(len(pool))] for _ in range(count)]


def prompt_order(n: int, needed: int, seed: int) -> list[int]:
    """Prompt indices for every round: passes over the prompts, each in a new seeded order."""
    rng, order = random.Random(seed), []
    while len(order) < needed:
        permutation = list(range(n))
        rng.shuffle(permutation)
        order += permutation
    return order[:needed]


def collect_rollout(online, prompts: list, round_index: int) -> tuple[Rollout, dict]:
    """The round's rollout and what users watch in it: the share of groups whose rewards all tie (no signal for a
    group-relative advantage), the sampled tokens' entropy estimate, response length, the share cut short. With
    dynamic sampling tied groups are dropped and fresh prompts sampled, at most max_refills times, until
    prompts_per_round groups are kept (the surplus is discarded, as verl's recipe does); if the refills run out,
    the round trains on the groups kept. online: the run (online/run.OnlineRun)."""
    cfg = online.cfg
    rollout = sharded_rollout(online, prompts, round_index)
    metrics = round_metrics(rollout)
    if not cfg.dynamic:
        return rollout, metrics
    kept, refills = untied(rollout, tied_groups(rollout.rewards)), 0
    while kept.rewards.shape[0] < len(prompts) and refills < cfg.max_refills:
        refills += 1
        fresh = refill_prompts(online.prompts, len(prompts), cfg.seed, round_index, refills)
        more = sharded_rollout(online, fresh, round_index, refills)
        kept = join_rollouts([kept, untied(more, tied_groups(more.rewards))], sequential=True)
    kept = select_groups(kept, list(range(min(len(prompts), kept.rewards.shape[0]))))
    return kept, {**metrics, "refills": refills, "kept_groups": kept.rewards.shape[0]}


def round_metrics(rollout: Rollout) -> dict:
    return {"zero_std_share": float(tied_groups(rollout.rewards).float().mean()), **rollout_stats(rollout),
            **rollout.stats}


def round_seed(cfg, round_index: int, refill: int = 0, first: int = 0) -> int:
    """The seed of a round's generate call: by the round, the refill and its first prompt's place in the round."""
    return cfg.seed + 10_007 * (round_index + 1) + 7_919 * refill + first


def round_shape(cfg, seed: int) -> RolloutShape:
    """A training round's rollout shape (k samples, max_length, the reward shaping), with the generate call's seed."""
    overlong = (cfg.sampling.max_new_tokens, cfg.overlong_cache, cfg.overlong_penalty) if cfg.overlong_cache else None
    return RolloutShape(cfg.num_samples, cfg.max_length, cfg.missing_eos_penalty, overlong, seed)


def sharded_rollout(online, prompts: list, round_index: int, refill: int = 0) -> Rollout:
    """This rank's contiguous share of the prompts, sampled and scored, then every rank's shares joined in order.
    Each generate call is seeded by its first prompt's place in the round, so the samples are those one process
    draws (when the share is a multiple of sampling.batch_size)."""
    cfg = online.cfg
    first, share = rank_share(online, prompts)
    shape = round_shape(cfg, round_seed(cfg, round_index, refill, first))
    local = rollout_of(online.engine_for(round_index), online.tokenizer, share,
                       online.environments or round_reward(online), cfg.sampling, shape)
    return joined_over_ranks(online, local)


def rank_share(online, prompts: list) -> tuple[int, list]:
    """(its first prompt's place, this rank's contiguous share of a round's prompts)."""
    ctx = online.run.ctx
    size = len(prompts) // ctx.world_size
    return ctx.rank * size, prompts[ctx.rank * size:(ctx.rank + 1) * size]


def joined_over_ranks(online, local: Rollout) -> Rollout:
    """Every rank's share of a round, joined in rank order (on the producer's own group under async)."""
    ctx = online.run.ctx
    return join_rollouts(gather_objects(local, ctx, online.rollout_group)) if ctx.enabled else local


def round_reward(online):
    """What scores a round's answers: the run's reward, or (self-rewarding) the judge of the policy as it is now."""
    return online.judge_for(online.policy) if online.judge_for is not None else online.reward


def rollout_of(model, tokenizer, prompts: list, source, sampling: SamplingOptions, shape: RolloutShape) -> Rollout:
    """One rollout of the prompts. source: a Reward (single-turn answers), or the run's EnvironmentSetup (multi-turn:
    the prompts are records, each talked through shape.num_samples times)."""
    if isinstance(source, EnvironmentSetup):
        return environment_rollout(model, tokenizer, prompts, sampling, shape, source)
    return generate_rollout(model, tokenizer, prompts, source, sampling, shape)


def mean_reward(rollout: Rollout) -> float:
    rewards = rollout.rewards[~rollout.rewards.isnan()]
    return float(rewards.mean()) if len(rewards) else float("nan")


def evaluate_policy(model, tokenizer, prompts: list, reward, sampling: SamplingOptions,
                    shape: RolloutShape) -> tuple[dict, Rollout]:
    """Mean reward of shape.num_samples samples per prompt (model: the policy, or an engine holding its weights;
    reward: as rollout_of's source), and the rollout, for a KL on exactly the sampled tokens
    (online/summary.sample_kl)."""
    rollout = rollout_of(model, tokenizer, prompts, reward, sampling, shape)
    return {"reward": mean_reward(rollout), "samples": rollout.num_samples}, rollout
