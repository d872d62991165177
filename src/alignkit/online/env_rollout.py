"""The rollout of a run with an environment: k multi-turn conversations per record (envs.run_trajectories), returned
in the single-turn rollout's layout so every experience builder and loss takes it unchanged. A record's prompt is
its k conversations' shared prefix; each conversation after it is one response whose loss mask covers exactly the
tokens the engine sampled (environment turns carry none), with the engine's log-probs on those tokens.

A conversation that forked (its template re-rendered earlier turns) trains on every segment: its later segments go in
Rollout.forked, one example per record and level in the record's k slots, so each segment is a training sequence
whose mask covers its own sampled tokens and which takes its conversation's reward (the group stays the record's k
conversations). A conversation stopped by a limit counts as cut (finished False; mask_truncated drops it), as a
sample cut at max_new_tokens does.

Each example also carries, for per-turn credit (online/turn_credit.py), the assistant turn of each trained token
(extras["turns"]) and, on a record's first example, each conversation's per-turn returns (extras["turn_returns"])."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from alignkit.config import SamplingOptions
from alignkit.data.tokenize import TokenizedExample
from alignkit.envs import EnvError, EnvironmentFactory, Limits, Trajectory, load_environment, run_trajectories
from alignkit.envs.trajectory import Segment
from alignkit.errors import ConfigError
from alignkit.online.rollout import Rollout, RolloutShape, shaped_rewards
from alignkit.online.turn_credit import turn_returns


@dataclass
class EnvironmentSetup:
    """A run's environments, their limits, and the reward that scores a conversation the environment left unscored
    (TRL's reward_funcs: called with the prompt and the last assistant answer)."""

    factory: EnvironmentFactory
    limits: Limits
    reward: object = None

    @classmethod
    def from_config(cls, cfg, reward) -> EnvironmentSetup | None:
        if cfg.environment is None:
            return None
        limits = Limits(max_turns=cfg.max_turns, max_tokens=cfg.max_length, reward=cfg.environment_reward,
                        require_reward=False, workers=cfg.env_workers)
        return cls(load_environment(cfg.environment, limits), limits, reward)


def environment_rollout(engine, tokenizer, records: list[dict], sampling: SamplingOptions, shape: RolloutShape,
                        setup: EnvironmentSetup) -> Rollout:
    """shape.num_samples conversations per record, each with its own environment instance."""
    tic = time.perf_counter()
    rows, envs, limits = round_conversations(records, shape, setup)
    trajectories = run_trajectories(engine, tokenizer, envs, rows, sampling, limits)
    return trajectories_rollout(records, trajectories, shape, setup, time.perf_counter() - tic)


def round_conversations(records: list[dict], shape: RolloutShape, setup: EnvironmentSetup) -> tuple[list, list, Limits]:
    """(rows, environments, limits) of a round's conversations: each record k times with its 1-based number in `_row`
    (so its errors name one row wherever they arise), an environment per row, and the limits seeded by the round
    (shape.seed is seeded by the first record's place in the round, so seed * k + j counts conversations from the
    round's start: a rank's share draws what one process draws, trajectory.run_trajectories)."""
    numbered = [record if record.get("_row") else {**record, "_row": b + 1} for b, record in enumerate(records)]
    rows = [record for record in numbered for _ in range(shape.num_samples)]
    envs = [setup.factory.make(row, row["_row"]) for row in rows]
    return rows, envs, setup.limits.model_copy(update={"seed": shape.seed * shape.num_samples})


def trajectories_rollout(records: list[dict], trajectories: list[Trajectory], shape: RolloutShape,
                         setup: EnvironmentSetup, generated: float) -> Rollout:
    """The rollout of the records' finished conversations (k per record, in order)."""
    k = shape.num_samples
    numbers = [t.row["_row"] for t in trajectories]
    unanswered = next((i for i, t in enumerate(trajectories) if t.turns == 0), None)
    if unanswered is not None:
        raise ConfigError("max_length", f"the prompt of record {numbers[unanswered]} ({trajectories[unanswered].env}) "
                                        f"leaves no room for an answer within max_length {shape.max_length}")
    examples, engine_logps, finished, texts, forked = [], [], [], [], []
    for b in range(len(records)):
        group = trajectories[b * k:(b + 1) * k]
        check_one_prompt(group, numbers[b * k])
        levels = [_level_examples([t.segments[level] if level < len(t.segments) else None for t in group],
                                  shape.max_length) for level in range(1 + max(t.forks for t in group))]
        example, logps = levels[0][0]
        examples.append(example)
        engine_logps.append(logps)
        forked.append([part for level in levels[1:] for part in level])
        finished.append([t.done and all(len(s.ids) <= shape.max_length for s in t.segments) for t in group])
        texts.append([_conversation_text(t) for t in group])
    tic = time.perf_counter()
    finished = torch.tensor(finished, dtype=torch.bool)
    rewards = shaped_rewards(_rewards(trajectories, records, k, setup.reward), finished,
                             [e.response_ids for e in examples], shape)
    for b, example in enumerate(examples):  # per-turn credit (online/turn_credit.py) reads them
        example.extras["turn_returns"] = [turn_returns(t.turn_rewards, r) for t, r in
                                          zip(trajectories[b * k:(b + 1) * k], rewards[b].tolist())]
    total = sum(len(s) for e in examples + [e for parts in forked for e, _ in parts] for s in e.response_ids)
    rollout = Rollout([r.get("prompt") for r in records], texts, examples, rewards, finished, total, generated,
                      time.perf_counter() - tic, engine_logps, forked=forked if any(forked) else None)
    rollout.stats = trajectory_stats(trajectories)
    return rollout


def check_one_prompt(group: list[Trajectory], row: int) -> None:
    """A record's k conversations start from one prompt: group-relative methods compare samples of one prompt."""
    heads = [_head(t.segments[0]) for t in group]
    start = min(heads)
    if any(t.segments[0].ids[:start] != group[0].segments[0].ids[:start] for t in group):
        raise EnvError(group[0].env, row, "its reset gave the rollouts of one record different prompts",
                       "group-relative methods compare samples of one prompt: make reset depend on the row only")


def _head(segment: Segment) -> int:
    """Tokens before the segment's first sampled one."""
    return segment.loss_mask.index(1) if 1 in segment.loss_mask else len(segment.ids)


def _level_examples(slots: list[Segment | None], max_length: int) -> list[tuple[TokenizedExample, torch.Tensor]]:
    """[(example, the engine's log-probs on its trained tokens)] of one level of a record's k conversations (their
    first segments, or their second, ...): one example in the k slots, a slot empty (None) where a conversation has
    no such segment; its prompt is the segments' common head. Later segments that share no first token: one example
    per segment."""
    present = [s for s in slots if s is not None]
    start = min(_head(s) for s in present)
    while start and any(s.ids[:start] != present[0].ids[:start] for s in present):
        start -= 1
    if not start:  # a prompt needs a first token: each segment alone, in its own slot
        return [part for i, s in enumerate(slots) if s is not None
                for part in _level_examples([s if j == i else None for j in range(len(slots))], max_length)]
    room = max_length - start
    responses = [[] if s is None else s.ids[start:][:room] for s in slots]
    masks = [[] if s is None else [bool(m) for m in s.loss_mask[start:][:room]] for s in slots]
    logps = torch.tensor([lp for s, mask in zip(slots, masks) if s is not None
                          for lp, m in zip(s.engine_logps[start:], mask) if m], dtype=torch.float32)
    turns = [[] if s is None else [t for t, m in zip(s.turns[start:], mask) if m] for s, mask in zip(slots, masks)]
    return [(TokenizedExample(list(present[0].ids[:start]), responses, response_loss_masks=masks,
                              extras={"turns": turns}), logps)]


def _rewards(trajectories: list[Trajectory], records: list[dict], k: int, reward) -> list:
    """Each conversation's reward (None: none); where the environment gave none, `reward` scores the last answer."""
    values = [t.reward for t in trajectories]
    missing = [i for i, v in enumerate(values) if v is None]
    if missing and reward is not None:
        answers = [_last_answer(trajectories[i]) for i in missing]
        for i, score in zip(missing, reward([records[i // k].get("prompt") for i in missing], answers)):
            values[i] = score
    return values


def _last_answer(trajectory: Trajectory) -> str:
    return next((m["content"] for m in reversed(trajectory.messages) if m["role"] == "assistant"), "")


def _conversation_text(trajectory: Trajectory) -> str:
    """The conversation after the prompt, for rollouts.jsonl and reports: one line per message, its role first."""
    first = next((i for i, m in enumerate(trajectory.messages) if m["role"] == "assistant"), len(trajectory.messages))
    return "\n".join(f"[{m['role']}] {m.get('text', m['content'])}" for m in trajectory.messages[first:])


def trajectory_stats(trajectories: list[Trajectory]) -> dict[str, float]:
    """What users watch in a multi-turn rollout: turns, tool calls and their errors per conversation, the shares
    stopped by max_turns and by the token budget, and forks."""
    n = max(len(trajectories), 1)
    return {"turns": sum(t.turns for t in trajectories) / n,
            "tool_calls": sum(t.tool_calls for t in trajectories) / n,
            "tool_errors": sum(t.tool_errors for t in trajectories) / n,
            "max_turns_share": sum(t.limit == "max_turns" for t in trajectories) / n,
            "max_tokens_share": sum(t.limit == "max_tokens" for t in trajectories) / n,
            "forks": float(sum(t.forks for t in trajectories))}
