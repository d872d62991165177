"""Preference pairs from scored samples: the best against the worst of each prompt's responses."""

from __future__ import annotations

import math


def best_worst(values: list[float], candidates: list[int] | None = None) -> tuple[int, int] | None:
    """(best, worst) indices among candidates (default: all) by value, the first of equals on both sides, NaN never
    chosen; None when fewer than two remain or best and worst tie (a tie says nothing)."""
    kept = [i for i in (candidates if candidates is not None else range(len(values))) if not math.isnan(values[i])]
    if len(kept) < 2:
        return None
    best = max(kept, key=lambda i: (values[i], -i))
    worst = min(kept, key=lambda i: (values[i], i))
    return (best, worst) if values[best] > values[worst] else None


def best_worst_pairs(prompts: list, groups: list[list[str]], scores: list[list[float]], min_gap: float = 0.0,
                     n: int | None = None) -> list[dict]:
    """{prompt, chosen, rejected, chosen_reward, rejected_reward, n} per prompt whose best and worst differ by
    at least min_gap and by more than 0, skipping empty responses (not valid pair records)."""
    pairs = []
    for prompt, group, values in zip(prompts, groups, scores):
        chosen = best_worst(values, [i for i, text in enumerate(group) if text.strip()])
        if chosen is None or values[chosen[0]] - values[chosen[1]] < min_gap:
            continue
        best, worst = chosen
        pairs.append({"prompt": prompt, "chosen": group[best], "rejected": group[worst],
                      "chosen_reward": values[best], "rejected_reward": values[worst], "n": n or len(group)})
    return pairs
