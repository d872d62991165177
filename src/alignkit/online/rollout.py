"""The rollout: k responses per prompt sampled from the current policy, scored with a Reward, and returned as
tokenised examples (each prompt once, its k responses after it: the packer's prefix-shared layout).

This side only needs texts back from generate.sample.sample_with_counts, which accepts a vLLM engine in place of the
HF model: generation can move to another engine or process as long as its weights are synced after each learner
update (not done here: on one CPU the HF model is the generator). Responses are re-tokenised from their text the way
training tokenises them (data.tokenize), with the end token kept only where the sample really stopped."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from alignkit.data.tokenize import TokenizedExample, tokenize_record
from alignkit.generate.sample import SamplingConfig, sample_with_counts


@dataclass
class Rollout:
    prompts: list
    texts: list[list[str]]  # [prompt][sample]
    examples: list[TokenizedExample]  # one per prompt: its k responses in sample order
    rewards: torch.Tensor  # [B, k] (NaN where the reward could not score a sample, e.g. an unparsed judgement)
    finished: torch.Tensor  # [B, k] bool: the sample ended with an end token, not at max_new_tokens
    generated_tokens: int
    generate_seconds: float
    reward_seconds: float

    @property
    def num_samples(self) -> int:
        return sum(len(group) for group in self.texts)


def join_rollouts(parts: list[Rollout]) -> Rollout:
    """Several ranks' rollouts (in rank order) as one: the round's prompts in their order; the seconds are the
    slowest rank's (they ran side by side)."""
    return Rollout([p for r in parts for p in r.prompts], [t for r in parts for t in r.texts],
                   [e for r in parts for e in r.examples], torch.cat([r.rewards for r in parts]),
                   torch.cat([r.finished for r in parts]), sum(r.generated_tokens for r in parts),
                   max(r.generate_seconds for r in parts), max(r.reward_seconds for r in parts))


def response_ids(tokenizer, prompt, text: str, finished: bool, max_length: int) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of one sample, tokenised as training does (plain prompts: the text + EOS; chats: the
    template's assistant turn). A sample cut at max_new_tokens keeps no EOS: the policy never produced one."""
    example = tokenize_record(tokenizer, {"prompt": prompt, "completion": text}, "sft", max_length)
    ids = example.response_ids[0]
    if not finished and len(ids) > 1 and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]
    return example.prompt_ids, ids


def generate_rollout(generator, tokenizer, prompts: list, reward, num_samples: int, sampling: SamplingConfig,
                     max_length: int = 1024, missing_eos_penalty: float | None = None) -> Rollout:
    """Sample num_samples responses per prompt with `generator` (the policy, or a vLLM engine holding its weights),
    score them with `reward` (a Reward: reward(prompts, responses) -> floats) and tokenise them.
    missing_eos_penalty: subtracted from the reward of samples cut at max_new_tokens (TRL's option)."""
    tic = time.perf_counter()
    samples = sample_with_counts(generator, tokenizer, prompts, sampling, num_samples)
    generated = time.perf_counter() - tic
    # A sample stopped on an end token iff it used fewer than max_new_tokens (one that ends exactly on the limit
    # counts as cut: its EOS is then not trained, which is harmless).
    finished = torch.tensor([[n < sampling.max_new_tokens for n in row] for row in samples.num_tokens])
    examples = []
    for prompt, texts, done in zip(prompts, samples.texts, finished.tolist()):
        pairs = [response_ids(tokenizer, prompt, text, stop, max_length) for text, stop in zip(texts, done)]
        examples.append(TokenizedExample(pairs[0][0], [ids for _, ids in pairs]))
    tic = time.perf_counter()
    flat = reward([p for p, group in zip(prompts, samples.texts) for _ in group],
                  [text for group in samples.texts for text in group])
    rewards = torch.tensor([math.nan if r is None else float(r) for r in flat], dtype=torch.float32)
    rewards = rewards.view(len(prompts), num_samples)
    if missing_eos_penalty:
        rewards = rewards - missing_eos_penalty * (~finished).float()
    return Rollout(list(prompts), samples.texts, examples, rewards, finished, samples.total_tokens, generated,
                   time.perf_counter() - tic)
