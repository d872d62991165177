"""Best-of-n: sample n responses per prompt from the policy and keep the one the reward scores highest
(ties -> the first sampled). n = 1 is plain sampling, the baseline every other method is compared with."""

from __future__ import annotations

from pydantic import Field

from alignkit.config import SamplingOptions, Strict
from alignkit.decode.base import Compute, DecodeResult, sampling_record
from alignkit.generate.sample import sample_with_counts
from alignkit.rewards.base import score_groups


class BoNOptions(Strict):
    num_samples: int = Field(8, gt=0, description="samples per prompt; the highest-reward one is kept")
    seed: int = Field(0, description="of the sampling")


def argmax_first(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def best_of_n(model, tokenizer, prompts: list, reward, opts: BoNOptions, sampling: SamplingOptions) -> DecodeResult:
    """The highest-reward response of opts.num_samples samples per prompt; details keep every candidate and its
    reward."""
    n = opts.num_samples
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    samples = sample_with_counts(model, tokenizer, prompts, sampling, n, opts.seed)
    scores = score_groups(reward, prompts, samples.texts)
    compute = Compute()
    compute.add(tokens=samples.total_tokens, passes=samples.total_tokens, rewards=n * len(prompts))
    picks = [argmax_first(s) for s in scores]
    return DecodeResult(
        method="sample" if n == 1 else f"bon-{n}", prompts=list(prompts),
        responses=[group[i] for group, i in zip(samples.texts, picks)],
        rewards=[s[i] for s, i in zip(scores, picks)], compute=compute,
        details=[{"candidates": group, "candidate_rewards": s, "chosen_index": i}
                 for group, s, i in zip(samples.texts, scores, picks)],
        options={"n": n, **sampling_record(sampling, opts.seed)},
    )


def plain_sampling(model, tokenizer, prompts: list, reward, sampling: SamplingOptions, seed: int = 0) -> DecodeResult:
    """One sample per prompt, scored: the baseline."""
    return best_of_n(model, tokenizer, prompts, reward, BoNOptions(num_samples=1, seed=seed), sampling)
