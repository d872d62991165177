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
    weighted: bool = Field(False, description="weighted best-of-n: the answer whose candidates' rewards sum highest")


def argmax_first(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def weighted_pick(rewards: list[float], answers: list) -> int:
    """Weighted best-of-n (Li et al., arXiv 2206.02336; with a PRM, Lightman et al. arXiv 2305.20050): the answer
    whose candidates' rewards sum highest wins, and of its candidates the best-scored (ties -> the first sampled).
    A candidate without an answer (None) is never merged with another."""
    totals: dict = {}
    for i, (reward, answer) in enumerate(zip(rewards, answers)):
        key = ("answer", answer) if answer is not None else ("alone", i)
        totals[key] = totals.get(key, 0.0) + reward
    keys = [("answer", a) if a is not None else ("alone", i) for i, a in enumerate(answers)]
    best = max(range(len(keys)), key=lambda i: (totals[keys[i]], rewards[i], -i))
    return best


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
    if opts.weighted:
        from alignkit.rewards.verifiable.math import extract_answer

        picks = [weighted_pick(s, [extract_answer(t) for t in group]) for s, group in zip(scores, samples.texts)]
    else:
        picks = [argmax_first(s) for s in scores]
    return DecodeResult(
        method="sample" if n == 1 else f"{'weighted-' if opts.weighted else ''}bon-{n}", prompts=list(prompts),
        responses=[group[i] for group, i in zip(samples.texts, picks)],
        rewards=[s[i] for s, i in zip(scores, picks)], compute=compute,
        details=[{"candidates": group, "candidate_rewards": s, "chosen_index": i}
                 for group, s, i in zip(samples.texts, scores, picks)],
        options={"n": n, "weighted": opts.weighted, **sampling_record(sampling, opts.seed)},
    )


def plain_sampling(model, tokenizer, prompts: list, reward, sampling: SamplingOptions, seed: int = 0) -> DecodeResult:
    """One sample per prompt, scored: the baseline."""
    return best_of_n(model, tokenizer, prompts, reward, BoNOptions(num_samples=1, seed=seed), sampling)
