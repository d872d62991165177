"""Pairwise judges and position-bias calibration.

A judge gives P(first shown is better) for (prompt, first, second); 0.5 is a tie. LLM judges favour a position,
so `pairwise_win_rate` judges every pair in both orders (FairEval's Balanced Position Calibration, arXiv
2305.17926: average the two orders, then decide) and reports the positional consistency rate (the share of
pairs whose verdict survives the swap). With split_merge, pairs judged inconsistently are judged again on a
merged prompt that interleaves aligned segments of the two answers (PORTIA, arXiv 2310.01432; segment count
and split rule are UNVERIFIED against the paper, see the method sheet section 16)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from alignkit.data.template import render_chat
from alignkit.errors import AlignkitError
from alignkit.models.inference import eval_mode, left_pad
from alignkit.train.packing import pad_token_id


class Judge:
    """prefer(prompts, firsts, seconds) -> P(first better) per pair, in [0, 1]."""

    name = "judge"

    def prefer(self, prompts: list, firsts: list[str], seconds: list[str]) -> list[float]:
        raise NotImplementedError


@dataclass
class RewardJudge(Judge):
    """Compares rewards: 1 / 0 / 0.5 on a tie; with temperature > 0, sigmoid((r_first - r_second) / temperature).
    Has no position bias by construction: the reference point for calibrated judges."""

    reward: object
    temperature: float = 0.0
    name: str = "reward"

    def prefer(self, prompts, firsts, seconds):
        a, b = self.reward(prompts, firsts), self.reward(prompts, seconds)
        if self.temperature > 0:
            return [1 / (1 + math.exp(-(x - y) / self.temperature)) for x, y in zip(a, b)]
        return [1.0 if x > y else 0.0 if x < y else 0.5 for x, y in zip(a, b)]


@dataclass
class FunctionJudge(Judge):
    """A callable fn(prompt, first, second) -> P(first better)."""

    fn: Callable[[object, str, str], float]
    name: str = "function"

    def prefer(self, prompts, firsts, seconds):
        return [float(self.fn(p, a, b)) for p, a, b in zip(prompts, firsts, seconds)]


JUDGE_TEMPLATE = (
    "Which response answers the question better?\nQuestion: {question}\nResponse A: {first}\nResponse B: {second}\n"
    "Answer with A or B.\nAnswer:"
)
MERGED_TEMPLATE = (
    "Which assistant answers the question better? Their answers are shown in aligned parts.\n"
    "Question: {question}\n{parts}\nAnswer with A or B.\nAnswer:"
)


class LLMJudge(Judge):
    """A causal LM as judge: P(first) = softmax over the next-token log-probs of the two choice tokens after the
    judge prompt (rendered through the chat template when the tokenizer has one). Choices must be single tokens."""

    name = "llm"

    def __init__(self, model, tokenizer, choices: tuple[str, str] = ("A", "B"), segments: int = 3, batch_size: int = 16,
                 templates: tuple[str, str] = (JUDGE_TEMPLATE, MERGED_TEMPLATE)):
        """templates: the judge prompt of whole responses, and of responses split into aligned parts (split-merge)."""
        self.model, self.tokenizer = model, tokenizer
        self.template, self.merged_template = templates
        self.segments, self.batch_size = segments, batch_size
        self.choice_ids = []
        for choice in choices:
            ids = tokenizer(choice, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:  # " A" is one token in most BPE vocabularies where "A" after ":" is not
                ids = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise AlignkitError(f"LLM judge: choice {choice!r} is not a single token")
            self.choice_ids.append(ids[0])
        if len(set(self.choice_ids)) != 2 or tokenizer.unk_token_id in self.choice_ids:
            raise AlignkitError(f"LLM judge: choices {choices} are not two distinct tokens of the vocabulary")

    def _texts(self, prompts: list[str]) -> list[str]:
        if self.tokenizer.chat_template:
            return [render_chat(self.tokenizer, [{"role": "user", "content": p}], add_generation_prompt=True)
                    for p in prompts]
        return prompts

    def _p_first(self, judge_prompts: list[str]) -> list[float]:
        pad_id = pad_token_id(self.tokenizer)
        out: list[float] = []
        device = next(self.model.parameters()).device
        with eval_mode(self.model):
            for start in range(0, len(judge_prompts), self.batch_size):
                texts = self._texts(judge_prompts[start:start + self.batch_size])
                ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
                input_ids, mask, positions = left_pad(ids, pad_id, device)
                logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions).logits[:, -1]
                pair = torch.log_softmax(logits.float()[:, self.choice_ids], -1)
                out += pair[:, 0].exp().tolist()
        return out

    def prefer(self, prompts, firsts, seconds):
        return self._p_first([self.template.format(question=_text(p), first=a, second=b)
                              for p, a, b in zip(prompts, firsts, seconds)])

    def prefer_merged(self, prompts, firsts, seconds):
        """P(first better) on PORTIA's merged prompt: part i of A next to part i of B."""
        texts = []
        for p, a, b in zip(prompts, firsts, seconds):
            parts_a, parts_b = split_segments(a, self.segments), split_segments(b, self.segments)
            lines = []
            for i, (x, y) in enumerate(zip(parts_a, parts_b)):
                lines += [f"Assistant A, part {i + 1}: {x}", f"Assistant B, part {i + 1}: {y}"]
            texts.append(self.merged_template.format(question=_text(p), parts="\n".join(lines)))
        return self._p_first(texts)


def _text(prompt) -> str:
    return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)


def split_segments(text: str, k: int) -> list[str]:
    """k consecutive segments of about equal length, cut at sentence ends where there are enough sentences,
    else at words; fewer units than k leave empty trailing segments (so both answers have k parts)."""
    units = [u for u in re.split(r"(?<=[.!?])\s+", text.strip()) if u]
    if len(units) < k:
        units = text.split()
    total = sum(len(u) for u in units) or 1
    segments: list[list[str]] = [[] for _ in range(k)]
    done = 0
    for unit in units:
        index = min(k - 1, int(k * (done + len(unit) / 2) / total))  # the segment holding the unit's middle
        segments[index].append(unit)
        done += len(unit)
    return [" ".join(s) for s in segments]


def verdict(p: float) -> float:
    """1 if the first is preferred, 0 if the second, 0.5 for an exact tie."""
    return 1.0 if p > 0.5 else 0.0 if p < 0.5 else 0.5


@dataclass
class PairwiseJudgement:
    a_first: list[float]  # P(A better) with A shown first
    a_second: list[float]  # P(A better) with A shown second (1 - P(B better) with B first)
    merged: dict[int, float] | None = None  # split-and-merge P(A better) for the inconsistent pairs

    def summary(self) -> dict:
        n = len(self.a_first)
        raw = [verdict(p) for p in self.a_first]
        swapped = [verdict(p) for p in self.a_second]
        calibrated = [verdict((p + q) / 2) for p, q in zip(self.a_first, self.a_second)]
        out = {"pairs": n, "win_rate_raw": sum(raw) / n, "win_rate_swapped": sum(swapped) / n,
               "win_rate_calibrated": sum(calibrated) / n,
               "consistency_rate": sum(r == s for r, s in zip(raw, swapped)) / n}
        if self.merged is not None:
            merged = [verdict(self.merged[i]) if i in self.merged else c for i, c in enumerate(calibrated)]
            out["win_rate_split_merge"] = sum(merged) / n
            out["split_merge_pairs"] = len(self.merged)
        return out


def judge_both_orders(judge: Judge, prompts: list, responses_a: list[str], responses_b: list[str],
                      split_merge: bool = False) -> PairwiseJudgement:
    """Every pair judged with A first and with B first; with split_merge and a judge that has prefer_merged, the
    pairs whose verdict flips with the order are judged again, merged, in both orders and averaged."""
    a_first = judge.prefer(prompts, responses_a, responses_b)
    a_second = [1 - p for p in judge.prefer(prompts, responses_b, responses_a)]
    merged = None
    if split_merge:
        if not hasattr(judge, "prefer_merged"):
            raise AlignkitError(f"judge '{judge.name}' cannot judge merged prompts (split_merge needs an LLM judge)")
        flipped = [i for i, (p, q) in enumerate(zip(a_first, a_second)) if verdict(p) != verdict(q)]
        merged = {}
        if flipped:
            sub = ([prompts[i] for i in flipped], [responses_a[i] for i in flipped], [responses_b[i] for i in flipped])
            first = judge.prefer_merged(*sub)
            second = [1 - p for p in judge.prefer_merged(sub[0], sub[2], sub[1])]
            merged = {i: (p + q) / 2 for i, p, q in zip(flipped, first, second)}
    return PairwiseJudgement(a_first, a_second, merged)


def pairwise_win_rate(judge: Judge, prompts: list, responses_a: list[str], responses_b: list[str],
                      split_merge: bool = False) -> dict:
    """Win rate of A over B: raw (A always shown first), swapped, position-calibrated, and consistency rate."""
    return {"judge": judge.name, **judge_both_orders(judge, prompts, responses_a, responses_b, split_merge).summary()}
