"""InfAlign-style calibrated best-of-n (arXiv 2412.19792).

The calibrated reward of a response is its rank against the reference policy's responses to the same prompt:
    C(x, y) = P_{y'~pi_ref(.|x)}[r(x, y') < r(x, y)] + tie_weight * P[r(x, y') = r(x, y)],
estimated from m reference samples per prompt (an empirical CDF). Under pi_ref it is ~Uniform(0, 1) for every
prompt, so it does not care about per-prompt reward offsets or monotone reward transforms. tie_weight 0.5 (the
default) is the mid-rank, the win rate against a reference sample with ties counting half; tie_weight 1.0 is
the sheet's P[r' <= r] (the sheet marks the paper's exact form UNVERIFIED).

Selection: the candidate with the highest calibrated reward (ties -> higher raw reward -> first sampled). For a
single reward this is the same choice as plain best-of-n (C is monotone in r); it differs when the reward is
a WeightedSum whose parts are calibrated one by one (calibrate_components), which puts parts on different scales
onto one scale before they are added."""

from __future__ import annotations

import bisect
import json
from typing import Any

from pydantic import Field

from alignkit.config import SamplingOptions, Strict
from alignkit.decode.base import Compute, DecodeResult, sampling_record
from alignkit.errors import AlignkitError
from alignkit.generate.sample import sample_with_counts
from alignkit.rewards.base import Reward, WeightedSum, score_groups

REFERENCE_SEED_OFFSET = 1_000_003  # reference samples use a seed stream apart from the candidates'


def prompt_key(prompt) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def empirical_cdf(reference: list[float], value: float, tie_weight: float = 0.5) -> float:
    """Share of reference values below `value`, plus tie_weight times the share equal to it."""
    ordered = sorted(reference)
    below = bisect.bisect_left(ordered, value)
    equal = bisect.bisect_right(ordered, value) - below
    return (below + tie_weight * equal) / len(ordered)


class CalibratedReward(Reward):
    """A Reward: the empirical CDF of `reward` under the reference samples of the same prompt.

    With calibrate_components and a WeightedSum, each part is calibrated on its own and the calibrated parts
    are added with the sum's weights."""

    name = "calibrated"

    def __init__(self, reward: Reward, prompts: list, reference_responses: list[list[str]], tie_weight: float = 0.5,
                 calibrate_components: bool = False):
        if not 0.0 <= tie_weight <= 1.0:
            raise ValueError(f"tie_weight must be in [0, 1], got {tie_weight}")
        if any(len(group) == 0 for group in reference_responses):
            raise ValueError("every prompt needs at least one reference response")
        self.tie_weight = tie_weight
        parts = reward.parts if calibrate_components and isinstance(reward, WeightedSum) else [(reward, 1.0)]
        self.parts = parts
        self.reference: list[dict[str, list[float]]] = []  # per part: prompt key -> sorted reference rewards
        for part, _ in parts:
            scores = score_groups(part, prompts, reference_responses)
            self.reference.append({prompt_key(p): sorted(s) for p, s in zip(prompts, scores)})

    def calibrate(self, prompt, value: float, part: int = 0) -> float:
        """The calibrated value of a raw reward value of part `part` for this prompt."""
        key = prompt_key(prompt)
        if key not in self.reference[part]:
            raise AlignkitError(f"calibrated reward: no reference samples for prompt {key[:60]!r}")
        return empirical_cdf(self.reference[part][key], value, self.tie_weight)

    def score(self, prompts, responses):
        totals = [0.0] * len(responses)
        for j, (part, weight) in enumerate(self.parts):
            for i, (prompt, value) in enumerate(zip(prompts, part(prompts, responses))):
                totals[i] += weight * self.calibrate(prompt, value, j)
        return totals


class CalibratedOptions(Strict):
    num_samples: int = Field(8, gt=0, description="candidates per prompt")
    num_reference: int = Field(16, gt=0, description="reference samples per prompt")
    tie_weight: float = Field(0.5, ge=0, le=1, description="share of a tie counted as a win (0.5: the mid-rank)")
    calibrate_components: bool = Field(False, description="calibrate each part of a WeightedSum on its own")
    reference: Any = Field(None, exclude=True, description="the reference policy, loaded (default: the policy)")
    seed: int = Field(0, description="of the candidates' sampling (the reference's: seed + REFERENCE_SEED_OFFSET)")


def calibrated_best_of_n(model, tokenizer, prompts: list, reward: Reward, opts: CalibratedOptions,
                         sampling: SamplingOptions) -> DecodeResult:
    """Best of n by calibrated reward. Reference samples come from opts.reference (default: the policy itself)
    with a separate seed stream, and count in the compute. Returned rewards are the raw rewards; details hold
    each candidate's calibrated reward (for the chosen one: its win rate against a reference sample)."""
    n, num_reference, tie_weight = opts.num_samples, opts.num_reference, opts.tie_weight
    reference_model, calibrate_components = opts.reference, opts.calibrate_components
    reference = sample_with_counts(reference_model or model, tokenizer, prompts, sampling, num_reference,
                                   opts.seed + REFERENCE_SEED_OFFSET)
    calibrated = CalibratedReward(reward, prompts, reference.texts, tie_weight, calibrate_components)
    candidates = sample_with_counts(model, tokenizer, prompts, sampling, n, opts.seed)
    raw = score_groups(reward, prompts, candidates.texts)
    reward_parts = len(calibrated.parts)
    if reward_parts == 1:  # the raw rewards are all it needs: no second call of the reward
        cal = [[calibrated.calibrate(p, v) for v in r] for p, r in zip(prompts, raw)]
    else:
        cal = score_groups(calibrated, prompts, candidates.texts)
    picks = [max(range(n), key=lambda i, c=c, r=r: (c[i], r[i], -i)) for c, r in zip(cal, raw)]
    compute = Compute()
    tokens = reference.total_tokens + candidates.total_tokens
    candidate_calls = n if reward_parts == 1 else n * (1 + reward_parts)
    compute.add(tokens=tokens, passes=tokens, rewards=len(prompts) * (num_reference * reward_parts + candidate_calls))
    return DecodeResult(
        method=f"bon-calibrated-{n}", prompts=list(prompts),
        responses=[group[i] for group, i in zip(candidates.texts, picks)],
        rewards=[r[i] for r, i in zip(raw, picks)], compute=compute,
        details=[{"candidates": group, "candidate_rewards": r, "calibrated_rewards": c, "chosen_index": i,
                  "calibrated_reward": c[i]} for group, r, c, i in zip(candidates.texts, raw, cal, picks)],
        options={"n": n, "num_reference": num_reference, "tie_weight": tie_weight,
                 "calibrate_components": calibrate_components, **sampling_record(sampling, opts.seed)},
    )
