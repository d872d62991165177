"""Metrics for comparing two models' answers to the same prompts: reward gain with a paired bootstrap
interval, win rate, length and distinct-n."""

from __future__ import annotations

import numpy as np


def bootstrap_mean_ci(values, n_resamples: int = 10_000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Mean and percentile bootstrap interval of the mean."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_resamples, len(values)))].mean(axis=1)
    alpha = (1 - level) / 2
    return float(values.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def win_rate(rewards_a, rewards_b) -> float:
    """Share of prompts where A's reward beats B's; a tie counts half."""
    a, b = np.asarray(rewards_a, dtype=np.float64), np.asarray(rewards_b, dtype=np.float64)
    return float(((a > b) + 0.5 * (a == b)).mean())


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Distinct n-grams / all n-grams over a set of texts (Li et al. 2016); low values mean repetitive text."""
    total, seen = 0, set()
    for text in texts:
        words = text.split()
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


def mean_words(texts: list[str]) -> float:
    return float(np.mean([len(t.split()) for t in texts])) if texts else 0.0


def length_stats(texts: list[str], tokenizer=None) -> dict[str, float]:
    """Words (and tokens, given a tokenizer) per text: mean, median, 90th percentile, max; share of empty texts."""
    out: dict[str, float] = {"texts": len(texts), "empty_share": float(np.mean([not t.strip() for t in texts])) if texts else 0.0}
    counts = {"words": [len(t.split()) for t in texts]}
    if tokenizer is not None:
        counts["tokens"] = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    for unit, values in counts.items():
        values = np.asarray(values or [0], dtype=np.float64)
        out.update({f"{unit}_mean": float(values.mean()), f"{unit}_median": float(np.median(values)),
                    f"{unit}_p90": float(np.quantile(values, 0.9)), f"{unit}_max": float(values.max())})
    return out
