"""The rollout of a run with an environment: k multi-turn conversations per record (envs.run_trajectories), returned
in the single-turn rollout's layout so every experience builder and loss takes it unchanged. A record's prompt is
its k conversations' shared prefix; each conversation after it is one response whose loss mask covers exactly the
tokens the engine sampled (environment turns carry none), with the engine's log-probs on those tokens.

A conversation that forked (its template re-rendered earlier turns) trains on its first segment only, and a
conversation stopped by a limit counts as cut (finished False; mask_truncated drops it), as a sample cut at
max_new_tokens does."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from alignkit.config import SamplingOptions
from alignkit.data.tokenize import TokenizedExample
from alignkit.envs import EnvError, EnvironmentFactory, Limits, Trajectory, load_environment, run_trajectories
from alignkit.errors import ConfigError
from alignkit.online.rollout import Rollout, RolloutShape, shaped_rewards


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
                        require_reward=False)
        return cls(load_environment(cfg.environment, limits), limits, reward)


def environment_rollout(engine, tokenizer, records: list[dict], sampling: SamplingOptions, shape: RolloutShape,
                        setup: EnvironmentSetup) -> Rollout:
    """shape.num_samples conversations per record, each with its own environment instance."""
    k = shape.num_samples
    tic = time.perf_counter()
    # each record's number rides in its rows, so its errors name one row wherever they arise
    numbered = [record if record.get("_row") else {**record, "_row": b + 1} for b, record in enumerate(records)]
    rows = [record for record in numbered for _ in range(k)]
    numbers = [row["_row"] for row in rows]
    envs = [setup.factory.make(row, number) for row, number in zip(rows, numbers)]
    trajectories = run_trajectories(engine, tokenizer, envs, rows, sampling,
                                    setup.limits.model_copy(update={"seed": shape.seed}))
    generated = time.perf_counter() - tic
    unanswered = next((i for i, t in enumerate(trajectories) if t.turns == 0), None)
    if unanswered is not None:
        raise ConfigError("max_length", f"the prompt of record {numbers[unanswered]} ({trajectories[unanswered].env}) "
                                        f"leaves no room for an answer within max_length {shape.max_length}")
    examples, engine_logps, finished, texts = [], [], [], []
    for b in range(len(records)):
        group = trajectories[b * k:(b + 1) * k]
        example, logps, done = _group_example(group, shape.max_length, numbers[b * k])
        examples.append(example)
        engine_logps.append(logps)
        finished.append(done)
        texts.append([_conversation_text(t) for t in group])
    tic = time.perf_counter()
    finished = torch.tensor(finished, dtype=torch.bool)
    rewards = shaped_rewards(_rewards(trajectories, records, k, setup.reward), finished,
                             [e.response_ids for e in examples], shape)
    total = sum(len(s) for example in examples for s in example.response_ids)
    rollout = Rollout([r.get("prompt") for r in records], texts, examples, rewards, finished, total, generated,
                      time.perf_counter() - tic, engine_logps)
    rollout.stats = trajectory_stats(trajectories)
    return rollout


def _group_example(group: list[Trajectory], max_length: int, row: int):
    """(the example of one record's k conversations, the engine's log-probs on their trained tokens, finished)."""
    segments = [t.segments[0] for t in group]
    first = [s.loss_mask.index(1) if 1 in s.loss_mask else len(s.ids) for s in segments]
    start = min(first)
    prompt_ids = segments[0].ids[:start]
    if any(s.ids[:start] != prompt_ids for s in segments):
        raise EnvError(group[0].env, row, "its reset gave the rollouts of one record different prompts",
                       "group-relative methods compare samples of one prompt: make reset depend on the row only")
    room = max_length - start
    responses = [s.ids[start:][:room] for s in segments]
    masks = [[bool(m) for m in s.loss_mask[start:][:room]] for s in segments]
    logps = torch.tensor([lp for s, mask in zip(segments, masks) for lp, m in zip(s.engine_logps[start:], mask) if m],
                         dtype=torch.float32)
    done = [t.done and not t.forks and len(s.ids) <= max_length for t, s in zip(group, segments)]
    return TokenizedExample(list(prompt_ids), responses, response_loss_masks=masks), logps, done


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
