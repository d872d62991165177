"""Partial rollouts (`async: {max_staleness: N, partial: true}`): a round's responses are sampled in N segments of
tokens (with an environment: of assistant turns), segment j of round r with the weights of version
max(0, r - N + j). A response in flight across a weight push keeps its prefix; its later tokens are sampled by the
newer weights, which re-read the prefix (as vLLM does after a weight update) and record their own log-probs, so each
token's behaviour log-prob is its sampler's.

The switch points are token or turn counts, not moments: the run does not depend on thread timing. A checkpoint
keeps the rounds part-sampled (their tokens, log-probs and versions so far; conversations without their
environments, which are rebuilt by replaying their turns), and a resumed run samples their next segments with the
weights the uninterrupted run used."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from alignkit.config import SamplingOptions
from alignkit.envs import Limits
from alignkit.envs.base import close_all
from alignkit.envs.trajectory import (
    advance_trajectories,
    finish_trajectories,
    replay_environment,
    start_trajectories,
)
from alignkit.generate.engines import Generation, cut_at_stop, stop_token_ids
from alignkit.online import sampling
from alignkit.online.env_rollout import round_conversations, trajectories_rollout
from alignkit.online.rollout import (
    Rollout,
    RolloutShape,
    encoded_prompts,
    rollout_from_generation,
    training_examples,
)


def segment_span(total: int, segments: int, segment: int) -> range:
    """The positions (a response's token positions, or a conversation's assistant turns, 0-based) segment `segment`
    of `segments` samples: `total` split as evenly as integers allow."""
    return range(total * segment // segments, total * (segment + 1) // segments)


def segment_of(total: int, segments: int, position: int) -> int:
    """The segment that samples `position` (segment_span's inverse)."""
    return next(j for j in range(segments) if position < total * (j + 1) // segments)


@dataclass
class PartialRound:
    """A round's samples so far, prompt-major ([prompt][sample] flattened): their tokens, the engine's log-probs,
    their text (cut before a stop string), whether each stopped, and the tokens each cost."""

    prompts: list
    prompt_ids: list[list[int]]
    num_samples: int
    rows: list[list[int]]
    logps: list[list[float]]
    texts: list[str]
    stopped: list[bool]
    generated: list[int]
    segments: int
    seconds: float = 0.0
    segments_done: int = 0


def begin_round(tokenizer, prompts: list, shape: RolloutShape, segments: int) -> PartialRound:
    n = len(prompts) * shape.num_samples
    return PartialRound(list(prompts), encoded_prompts(tokenizer, prompts, shape.max_length), shape.num_samples,
                        [[] for _ in range(n)], [[] for _ in range(n)], [""] * n, [False] * n, [0] * n, segments)


def sample_segment(engine, tokenizer, state: PartialRound, sampling: SamplingOptions, seed: int) -> None:
    """Extend every sample that has not stopped by the next segment's tokens, sampled by `engine` from its prompt
    and its tokens so far. A later segment samples each group of batch_size prompts' rows in a call of its own,
    seeded by the group's first prompt, so a row's draws do not depend on how a round is shared out over ranks (as
    the first segment's chunks). Stop strings are matched on the whole response, so one that straddles two segments
    still ends it; a response that has not stopped has every segment's full count of tokens."""
    tic, k = time.perf_counter(), state.num_samples
    tokens = len(segment_span(sampling.max_new_tokens, state.segments, state.segments_done))
    live = [i for i, stopped in enumerate(state.stopped) if not stopped]
    options = sampling.model_copy(update={"max_new_tokens": max(tokens, 1)})
    if not (live and tokens):
        calls = []
    elif state.segments_done == 0:  # k samples of each prompt, the prompt's prefill shared by them
        calls = [(live, engine.generate(state.prompt_ids, options, k, seed))]
    else:
        groups: dict[int, list[int]] = {}
        for i in live:
            groups.setdefault(i // (k * sampling.batch_size), []).append(i)
        calls = [(rows, engine.generate([state.prompt_ids[i // k] + state.rows[i] for i in rows], options, 1,
                                        seed + group * sampling.batch_size)) for group, rows in groups.items()]
    end_ids = stop_token_ids(tokenizer, sampling.stop_strings)
    for rows, out in calls:
        flat = [sample for group in zip(out.ids, out.logprobs, out.generated) for sample in zip(*group)]
        for i, (ids, logps, cost) in zip(rows, flat):
            state.rows[i] += ids
            state.logps[i] += logps
            state.generated[i] += cost
            kept, state.texts[i], state.stopped[i] = cut_at_stop(tokenizer, state.rows[i], end_ids,
                                                                 sampling.stop_strings)
            del state.rows[i][len(kept):], state.logps[i][len(kept):]
    state.segments_done += 1
    state.seconds += time.perf_counter() - tic


def finish_round(state: PartialRound, reward, shape: RolloutShape) -> Rollout:
    """The round's rollout once its last segment is sampled, scored as a whole-round rollout is."""
    k = state.num_samples
    column = lambda values: [values[b * k:(b + 1) * k] for b in range(len(state.prompts))]  # noqa: E731
    generation = Generation(state.prompt_ids, column(state.rows), column(state.logps),
                            column(["stop" if stopped else "length" for stopped in state.stopped]),
                            column(state.texts), column(state.generated))
    return rollout_from_generation(state.prompts, generation, reward, shape, state.seconds)


def stamp_segments(rollout: Rollout, total: int, segments: int, version_of_segment, by_turn: bool) -> Rollout:
    """Each trained token with the version of the segment that sampled it: by its position in its response (single
    answers: a response that went on took each segment's full count of tokens, total = max_new_tokens), or by its
    assistant turn (conversations, total = max_turns)."""
    rollout.token_versions = [torch.tensor(
        [version_of_segment(segment_of(total, segments, position)) for position in
         ([t for turns in example.extras["turns"] for t in turns] if by_turn else
          [t for n in example.trained_lengths for t in range(n)])], dtype=torch.long)
        for example in training_examples(rollout)[0]]
    return rollout


@dataclass
class PartialConversations:
    """A round's multi-turn conversations so far (k per record): the trajectories in progress with their
    environments. A checkpoint keeps the conversations without the environments; the next segment rebuilds each by
    replaying its recorded turns (envs.trajectory.replay_environment)."""

    records: list[dict]
    runs: list  # envs.trajectory._Run
    limits: Limits
    seconds: float = 0.0
    segments_done: int = 0

    def __getstate__(self) -> dict:
        return {**self.__dict__, "runs": [replace(run, env=None) for run in self.runs]}


def begin_conversations(tokenizer, records: list[dict], shape: RolloutShape, setup) -> PartialConversations:
    """The round's environments made and reset, before the first turn (setup: the run's EnvironmentSetup)."""
    rows, envs, limits = round_conversations(records, shape, setup)
    try:
        return PartialConversations(list(records), start_trajectories(tokenizer, envs, rows, limits), limits)
    except BaseException:
        close_all(envs)
        raise


def sample_turns(engine, tokenizer, state: PartialConversations, sampling: SamplingOptions, segments: int,
                 setup) -> None:
    """The next segment's turns of every conversation still going, sampled by `engine`; environments dropped by a
    checkpoint are rebuilt first (replayed)."""
    tic = time.perf_counter()
    try:
        for run in state.runs:
            if run.env is None:
                replay_environment(setup.factory.make(run.trajectory.row, run.index), run)
        turns = segment_span(state.limits.max_turns, segments, state.segments_done)
        advance_trajectories(engine, tokenizer, state.runs, sampling, state.limits, turns)
    except BaseException:
        close_all([run.env for run in state.runs])
        raise
    state.segments_done += 1
    state.seconds += time.perf_counter() - tic


def finish_conversations(state: PartialConversations, shape: RolloutShape, setup) -> Rollout:
    """The round's rollout once its last segment is sampled; every environment closed."""
    try:
        trajectories = finish_trajectories(state.runs, state.limits)
    finally:
        close_all([run.env for run in state.runs])
    return trajectories_rollout(state.records, trajectories, shape, setup, state.seconds)


def collect_segment(online, round_index: int, segment: int, state):
    """The producer's job with partial rollouts: the next segment of round `round_index` of the run (online:
    online/run.OnlineRun), of tokens or (with an environment) of turns, sampled by the engine's current weights, each
    rank its share of the prompts; after the last segment, the round's (rollout, metrics), the ranks' shares joined
    and every token stamped with its segment's version."""
    cfg, segments, setup = online.cfg, online.segments, online.environments
    start = round_index * cfg.prompts_per_round
    first, batch = sampling.rank_share(online, [online.prompts[i] for i in
                                                online.order[start:start + cfg.prompts_per_round]])
    shape = sampling.round_shape(cfg, sampling.round_seed(cfg, round_index, first=first) + 104_729 * segment)
    if setup is not None:  # conversations: a segment of turns
        state = state or begin_conversations(online.tokenizer, batch, shape, setup)
        sample_turns(online.engine, online.tokenizer, state, cfg.sampling, segments, setup)
    else:  # single answers: a segment of tokens
        state = state or begin_round(online.tokenizer, batch, shape, segments)
        sample_segment(online.engine, online.tokenizer, state, cfg.sampling, shape.seed)
    if segment < segments - 1:
        return state
    if setup is not None:
        rollout = finish_conversations(state, shape, setup)
    else:
        rollout = finish_round(state, sampling.round_reward(online), shape)
    rollout = sampling.joined_over_ranks(online, rollout)
    total = cfg.max_turns if setup is not None else cfg.sampling.max_new_tokens
    rollout = stamp_segments(rollout, total, segments, lambda j: online.producer.version_of(round_index, j),
                             by_turn=setup is not None)
    return rollout, sampling.round_metrics(rollout)
