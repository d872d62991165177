"""The rollout: k responses per prompt sampled from the current policy by a rollout engine (generate/engines), scored
with a Reward, and returned as tokenised examples (each prompt once, its k responses after it: the packer's
prefix-shared layout).

Token-exact: the examples hold the engine's prompt ids and the ids it sampled, never text re-tokenised; an end token
is in a response exactly when the sampler emitted it. Text is decoded only for the reward and the reports. The
engine's per-token log-probs ride along (engine_logps), so the learner can measure and correct any gap between the
engine's distribution and the trainer's."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from alignkit.config import SamplingOptions
from alignkit.data.tokenize import TokenizedExample
from alignkit.errors import ConfigError
from alignkit.generate.engines import Generation, as_engine, encode_prompts
from alignkit.rewards.shaping import soft_overlong_penalty


@dataclass
class Rollout:
    prompts: list
    texts: list[list[str]]  # [prompt][sample], for the reward and reports
    examples: list[TokenizedExample]  # one per prompt: its k sampled responses (token ids) in sample order
    rewards: torch.Tensor  # [B, k] (NaN where the reward could not score a sample, e.g. an unparsed judgement)
    finished: torch.Tensor  # [B, k] bool: the sampler stopped the sample (end token / stop string), not max_new_tokens
    generated_tokens: int
    generate_seconds: float
    reward_seconds: float
    engine_logps: list[torch.Tensor] | None = None  # per example, flat over its responses' tokens: the engine's
    stats: dict[str, float] = field(default_factory=dict)  # what else users watch (multi-turn: turns, tool calls)
    # Multi-turn: per prompt, the later segments of its forked conversations, each level one example in the prompt's
    # k slots (empty where that conversation has no such segment), with the engine's log-probs on its tokens.
    forked: list[list[tuple[TokenizedExample, torch.Tensor]]] | None = None
    # The weight version that sampled each token (version v: the policy after v rounds), per training example
    # (training_examples' order), flat over its responses' trained tokens; set once the rollout is complete.
    token_versions: list[torch.Tensor] | None = None

    @property
    def num_samples(self) -> int:
        return sum(len(group) for group in self.texts)


def training_examples(rollout: Rollout) -> tuple[list[TokenizedExample], list[torch.Tensor] | None, list[int]]:
    """The sequences the learner trains on: every prompt's example, then the later segments of forked conversations;
    with the engine's log-probs on each and the prompt (row of rewards, finished) each belongs to."""
    rows = list(range(len(rollout.examples)))
    if not rollout.forked:
        return rollout.examples, rollout.engine_logps, rows
    extra = [(b, example, logps) for b, parts in enumerate(rollout.forked) for example, logps in parts]
    engine = None if rollout.engine_logps is None else rollout.engine_logps + [logps for _, _, logps in extra]
    return rollout.examples + [e for _, e, _ in extra], engine, rows + [b for b, _, _ in extra]


def stamp_version(rollout: Rollout, version: int) -> Rollout:
    """Every token of the rollout sampled with the weights of `version` (a whole-round rollout; partial rollouts
    record each token's version as they sample: online/partial.py)."""
    examples = training_examples(rollout)[0]
    rollout.token_versions = [torch.full((sum(e.trained_lengths),), version, dtype=torch.long) for e in examples]
    return rollout


def join_rollouts(parts: list[Rollout], sequential: bool = False) -> Rollout:
    """Several ranks' rollouts (in rank order) as one: the round's prompts in their order; the seconds are the
    slowest rank's (they ran side by side), or their sum for rollouts drawn one after another (refills)."""
    total = sum if sequential else max
    engine = None if any(r.engine_logps is None for r in parts) else [t for r in parts for t in r.engine_logps]
    joined = Rollout([p for r in parts for p in r.prompts], [t for r in parts for t in r.texts],
                     [e for r in parts for e in r.examples], torch.cat([r.rewards for r in parts]),
                     torch.cat([r.finished for r in parts]), sum(r.generated_tokens for r in parts),
                     total(r.generate_seconds for r in parts), total(r.reward_seconds for r in parts), engine)
    samples = [r.num_samples for r in parts]
    if any(r.forked for r in parts):
        joined.forked = [f for r in parts for f in (r.forked or [[] for _ in r.examples])]
    for key in parts[0].stats:  # per-sample means, weighted by each part's samples
        joined.stats[key] = sum(r.stats[key] * n for r, n in zip(parts, samples)) / max(sum(samples), 1)
    return joined


def select_groups(rollout: Rollout, rows: list[int]) -> Rollout:
    """The rollout of the prompts at `rows` only (in that order)."""
    index = torch.tensor(rows, dtype=torch.long)
    examples = [rollout.examples[i] for i in rows]
    forked = None if rollout.forked is None else [rollout.forked[i] for i in rows]
    return Rollout([rollout.prompts[i] for i in rows], [rollout.texts[i] for i in rows], examples,
                   rollout.rewards[index], rollout.finished[index],
                   sum(len(s) for e in examples for s in e.response_ids), rollout.generate_seconds,
                   rollout.reward_seconds,
                   None if rollout.engine_logps is None else [rollout.engine_logps[i] for i in rows],
                   dict(rollout.stats), forked)


@dataclass(frozen=True)
class RolloutShape:
    """num_samples: responses per prompt; max_length: tokens of prompt + response (a response is cut to fit, and
    then counts as cut); missing_eos_penalty: subtracted from the reward of samples cut at max_new_tokens (TRL's
    option); overlong: (max_new_tokens, cache, factor) of DAPO's soft overlong punishment, added to the reward on
    the sampled token count."""

    num_samples: int
    max_length: int = 1024
    missing_eos_penalty: float | None = None
    overlong: tuple[int, int, float] | None = None
    seed: int = 0  # of this rollout's sampling


def generate_rollout(generator, tokenizer, prompts: list, reward, sampling: SamplingOptions,
                     shape: RolloutShape) -> Rollout:
    """Sample shape.num_samples responses per prompt with `generator` (an engine, or the policy for the hf engine),
    score them with `reward` (reward(prompts, responses) -> floats) and keep their token ids."""
    tic = time.perf_counter()
    prompt_ids = encoded_prompts(tokenizer, prompts, shape.max_length)
    generation = as_engine(generator, tokenizer, sampling).generate(prompt_ids, sampling, shape.num_samples, shape.seed)
    return rollout_from_generation(prompts, generation, reward, shape, time.perf_counter() - tic)


def encoded_prompts(tokenizer, prompts: list, max_length: int) -> list[list[int]]:
    """The prompts' token ids; a prompt that leaves no room for a response within max_length is refused."""
    prompt_ids = encode_prompts(tokenizer, prompts)
    too_long = next((i for i, ids in enumerate(prompt_ids) if len(ids) >= max_length), None)
    if too_long is not None:
        raise ConfigError("max_length", f"prompt {too_long + 1} of the round has {len(prompt_ids[too_long])} tokens, "
                                        f"leaving no room for a response within max_length {max_length}")
    return prompt_ids


def rollout_from_generation(prompts: list, generation: Generation, reward, shape: RolloutShape,
                            generate_seconds: float) -> Rollout:
    """The rollout of one Generation of the prompts: responses cut to max_length, scored by `reward`."""
    max_length = shape.max_length
    examples, engine_logps, finished = [], [], []
    for ids, samples, logps, reasons in zip(generation.prompt_ids, generation.ids, generation.logprobs,
                                            generation.finish_reasons):
        room = max_length - len(ids)
        examples.append(TokenizedExample(list(ids), [s[:room] for s in samples]))
        engine_logps.append(torch.tensor([lp for row in logps for lp in row[:room]], dtype=torch.float32))
        finished.append([r == "stop" and len(s) <= room for r, s in zip(reasons, samples)])
    finished = torch.tensor(finished, dtype=torch.bool)
    tic = time.perf_counter()
    flat = reward([p for p, group in zip(prompts, generation.texts) for _ in group],
                  [text for group in generation.texts for text in group])
    rewards = shaped_rewards(flat, finished, generation.ids, shape)
    total = sum(len(s) for example in examples for s in example.response_ids)
    return Rollout(list(prompts), generation.texts, examples, rewards, finished, total, generate_seconds,
                   time.perf_counter() - tic, engine_logps)


def shaped_rewards(values: list, finished: torch.Tensor, responses: list[list], shape: RolloutShape) -> torch.Tensor:
    """[B, k] rewards from the flat reward values (None: no reward, NaN), less missing_eos_penalty where a sample
    was cut and plus the soft overlong penalty on each response's length (responses: [B][k] token ids)."""
    rewards = torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float32)
    rewards = rewards.view(-1, shape.num_samples)
    if shape.missing_eos_penalty:
        rewards = rewards - shape.missing_eos_penalty * (~finished).float()
    if shape.overlong is not None:
        lengths = torch.tensor([[len(s) for s in samples] for samples in responses])
        rewards = rewards + soft_overlong_penalty(lengths, *shape.overlong)
    return rewards
