"""Self-rewarding: the policy judges its own samples with an LLM-as-judge prompt (Yuan et al., arXiv 2401.10020), and
CREAM's consistency (Wang et al., arXiv 2410.12735): how far the rankings of one prompt's samples by two consecutive
iterations' judges agree, which then weights that prompt's pair in the `cream` loss."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from alignkit.config import SamplingOptions
from alignkit.generate.sample import sample
from alignkit.rewards.base import Reward

# The additive 5-point prompt as several reimplementations give it (lucidrains/self-rewarding-lm-pytorch, Oxen-AI);
# UNVERIFIED against the paper's PDF (docs/online.md, self-rewarding).
JUDGE_TEMPLATE = """Review the user's question and the corresponding response using the additive 5-point scoring \
system described below. Points are accumulated based on the satisfaction of each criterion:
- Add 1 point if the response is relevant and provides some information related to the user's inquiry, even if it \
is incomplete or contains some irrelevant content.
- Add another point if the response addresses a substantial portion of the user's question, but does not completely \
resolve the query or provide a direct answer.
- Award a third point if the response answers the basic elements of the user's question in a useful way, regardless \
of whether it seems to have been written by an AI Assistant or if it has elements typically found in blogs or search \
results.
- Grant a fourth point if the response is clearly written from an AI Assistant's perspective, addressing the user's \
question directly and comprehensively, and is well-organized and helpful, even if there is slight room for \
improvement in clarity, conciseness or focus.
- Bestow a fifth point for a response that is impeccably tailored to the user's question by an AI Assistant, without \
extraneous information, reflecting expert knowledge, and demonstrating a high-quality, engaging, and insightful answer.

User: {prompt}
<response>{response}</response>

After examining the user's instruction and the response:
- Briefly justify your total score, up to 100 words.
- Conclude with the score using the format: "Score: <total points>"
"""

SCORE_PATTERN = re.compile(r"Score:\s*([0-9]+(?:\.[0-9]+)?)")


def parse_score(judgement: str) -> float | None:
    """The number after the last "Score:" of a judgement, or None if there is none."""
    found = SCORE_PATTERN.findall(judgement)
    return float(found[-1]) if found else None


def _prompt_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


@dataclass
class LLMJudge(Reward):
    """A model scoring (prompt, response) with JUDGE_TEMPLATE: the mean of the parsed scores of num_judgements
    sampled judgements; NaN when none parses (the sample is then left out of the pairs)."""

    model: object = None
    tokenizer: object = None
    template: str = JUDGE_TEMPLATE
    sampling: SamplingOptions = field(default_factory=lambda: SamplingOptions(max_new_tokens=128, temperature=0.7,
                                                                              top_p=0.9))
    seed: int = 0
    num_judgements: int = 3
    name: str = "llm_judge"

    def score(self, prompts, responses):
        texts = [self.template.format(prompt=_prompt_text(p), response=r) for p, r in zip(prompts, responses)]
        # A chat model reads the judge prompt as a user turn; a plain LM reads it verbatim.
        judge_prompts = [[{"role": "user", "content": t}] for t in texts] if self.tokenizer.chat_template else texts
        judgements = sample(self.model, self.tokenizer, judge_prompts, self.sampling, self.num_judgements,
                            self.seed)
        scores = []
        for group in judgements:
            parsed = [s for s in map(parse_score, group) if s is not None]
            scores.append(sum(parsed) / len(parsed) if parsed else math.nan)
        return scores


def ordinal_ranks(values: list[float]) -> list[int]:
    """Ranks 0..n-1, ties broken by position (scipy's rankdata(method="ordinal") - 1); NaN ranks lowest."""
    keyed = [(-math.inf if math.isnan(v) else v, i) for i, v in enumerate(values)]
    ranks = [0] * len(values)
    for rank, (_, i) in enumerate(sorted(keyed)):
        ranks[i] = rank
    return ranks


def kendall_tau(a: list[float], b: list[float]) -> float:
    """Kendall's tau between the ordinal ranks of a and b: (concordant - discordant) / (n (n - 1) / 2)."""
    ra, rb = ordinal_ranks(a), ordinal_ranks(b)
    n = len(ra)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    if not pairs:
        return 1.0
    return sum(1 if (ra[i] - ra[j]) * (rb[i] - rb[j]) > 0 else -1 for i, j in pairs) / len(pairs)


def consistency_weights(current: torch.Tensor, previous: torch.Tensor, method: str = "kendall") -> torch.Tensor:
    """[B] consistency of two [B, k] score tables (CREAM `cal_consistency.py`): kendall: (tau + 1) / 2;
    toporder: 1 if both put the same sample first and the same sample last, else 0."""
    weights = []
    for now, before in zip(current.tolist(), previous.tolist()):
        if method == "kendall":
            weights.append((kendall_tau(now, before) + 1) / 2)
        elif method == "toporder":
            rn, rb = ordinal_ranks(now), ordinal_ranks(before)
            weights.append(float(rn.index(0) == rb.index(0) and rn.index(len(rn) - 1) == rb.index(len(rb) - 1)))
        else:
            raise ValueError(f"unknown consistency {method!r}; known: kendall, toporder")
    return torch.tensor(weights, dtype=torch.float32)


def implicit_reward_agreement(implicit: torch.Tensor, triples: list[tuple[int, int, int]]) -> float:
    """Share of judged pairs (prompt, chosen, rejected) that the implicit DPO reward log pi_t - log pi_{t-1} [B, k]
    orders the same way (a tie counts half)."""
    if not triples:
        return math.nan
    hits = [float(implicit[b, i] > implicit[b, j]) + 0.5 * float(implicit[b, i] == implicit[b, j])
            for b, i, j in triples]
    return sum(hits) / len(hits)


def judge_factory(cfg, tokenizer, judge=None):
    """model -> the Reward judging that model's samples. judge: a Reward, or a function model -> Reward, standing in
    for the LLM judge; default cfg.judge ("self": the policy with JUDGE_TEMPLATE, else a reward spec)."""
    if judge is not None:
        return judge if callable(judge) and not hasattr(judge, "score") else (lambda model: judge)
    if cfg.judge != "self":
        from alignkit.rewards.spec import load_reward

        fixed = load_reward(cfg.judge, key="judge")
        return lambda model: fixed
    sampling = SamplingOptions(max_new_tokens=cfg.judge_max_new_tokens, temperature=0.7, top_p=0.9,
                               batch_size=cfg.sampling.batch_size)
    return lambda model: LLMJudge(model=model, tokenizer=tokenizer, sampling=sampling, seed=cfg.seed,
                                  num_judgements=cfg.judge_samples)
