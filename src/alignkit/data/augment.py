"""Reward-augmented preference data (arXiv 2410.08067, "reward-augmented DPO"): the loss stays DPO; the data is
conditioned on a target quality, so the model learns what each response's score means instead of only "chosen
beats rejected" (and does not unlearn a rejected response that is good, just less good).

Each pair (x, y_w, y_l) with scores s_w >= s_l becomes two:
  (goal(s_w) + x, y_w > y_l)   and   (goal(s_l) + x, y_l > y_w)   -- the roles swapped.
At inference, condition the prompt on the best score (reward_conditioned_prompt(prompt, 10))."""

from __future__ import annotations

from typing import Any

# The released code's goal text (reward-augmented-preference@47f0b8d scripts/reward_augmentation.py).
GOAL_TEMPLATE = (
    "You are an assistant that generates responses for the instruction while implicitly achieving the following "
    "target scores (on a scale of 1-10, where 1 is lowest and 10 is highest):\nOverall score: {score}."
)
MODES = ("system", "prefix")


def format_score(score: float) -> int | float:
    """An integral score prints as an integer (8, not 8.0), as in the released code."""
    return int(score) if float(score).is_integer() else score


def reward_conditioned_prompt(prompt: Any, score: float, mode: str = "system", template: str = GOAL_TEMPLATE) -> Any:
    """The prompt conditioned on a target score. mode "system": a system message with the goal (merged ahead of an
    existing one); "prefix" (the paper's "nosys" variant): the goal and a blank line before the user text.
    `prompt` is a string or a list of chat messages; "system" always returns messages."""
    goal = template.format(score=format_score(score))
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "prefix":
        if isinstance(prompt, str):
            return f"{goal}\n\n{prompt}"
        messages = [dict(m) for m in prompt]
        first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
        messages[first_user]["content"] = f"{goal}\n\n{messages[first_user]['content']}"
        return messages
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if messages and messages[0]["role"] == "system":
        messages[0]["content"] = f"{goal}\n\n{messages[0]['content']}"
        return messages
    return [{"role": "system", "content": goal}, *messages]


def reward_augmented_pairs(records: list[dict], chosen_score: str = "chosen_score",
                           rejected_score: str = "rejected_score", mode: str = "system", template: str = GOAL_TEMPLATE,
                           filter_fields: tuple[str, str] | None = None) -> list[dict]:
    """Pairs records with a score per response -> reward-augmented pairs (twice as many; DPO trains on them).

    Pairs whose chosen score is below the rejected one are dropped; the paper filters on the mean fine-grained
    score, give those fields as filter_fields=(chosen field, rejected field). The output holds the conditioned
    pairs of every kept record, then the swapped ones (the paper concatenates the two sets); each record keeps
    only prompt, chosen and rejected (a margin or other reward would not fit the swapped pair)."""
    kept = []
    for record in records:
        low_w, low_l = (record[f] for f in filter_fields) if filter_fields else (record[chosen_score],
                                                                               record[rejected_score])
        if low_w >= low_l:
            kept.append(record)
    conditioned = [{"prompt": reward_conditioned_prompt(r["prompt"], r[chosen_score], mode, template),
                    "chosen": r["chosen"], "rejected": r["rejected"]} for r in kept]
    swapped = [{"prompt": reward_conditioned_prompt(r["prompt"], r[rejected_score], mode, template),
                "chosen": r["rejected"], "rejected": r["chosen"]} for r in kept]
    return conditioned + swapped
