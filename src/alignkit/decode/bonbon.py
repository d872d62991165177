"""BoNBoN training data (arXiv 2406.00832): per prompt, the best and the worst of n samples from the reference
policy form a (chosen, rejected) pair. The pairs JSONL trains with `alignkit bonbon` (losses/bonbon.py:
alpha * SFT on the best + (1 - alpha) * IPO at the best-of-n matching beta) or any pairs loss (`alignkit dpo`)."""

from __future__ import annotations

from alignkit.decode.base import DecodeResult
from alignkit.decode.bon import best_of_n
from alignkit.generate.sample import SamplingConfig
from alignkit.losses.bonbon import bonbon_beta


def best_worst_pairs(prompts: list, groups: list[list[str]], scores: list[list[float]], min_gap: float = 0.0,
                     n: int | None = None) -> list[dict]:
    """{prompt, chosen, rejected, chosen_reward, rejected_reward, n} per prompt whose best and worst differ by
    at least min_gap and by more than 0 (a tie says nothing), skipping empty responses (not valid pair records)."""
    pairs = []
    for prompt, group, values in zip(prompts, groups, scores):
        kept = [i for i, text in enumerate(group) if text.strip()]
        if len(kept) < 2:
            continue
        best = max(kept, key=lambda i: (values[i], -i))
        worst = min(kept, key=lambda i: (values[i], i))
        gap = values[best] - values[worst]
        if gap > 0 and gap >= min_gap:
            pairs.append({"prompt": prompt, "chosen": group[best], "rejected": group[worst],
                          "chosen_reward": values[best], "rejected_reward": values[worst], "n": n or len(group)})
    return pairs


def bonbon_pairs(model, tokenizer, prompts: list, reward, n: int, cfg: SamplingConfig,
                 min_gap: float = 0.0) -> tuple[list[dict], DecodeResult]:
    """(pairs records, the best-of-n result they came from). Train them with loss 'bonbon' and
    beta = bonbon_beta(n), which `recommended_options(n)` returns."""
    if n < 2:
        raise ValueError(f"BoNBoN needs n >= 2 samples per prompt, got {n}")
    result = best_of_n(model, tokenizer, prompts, reward, n, cfg)
    groups = [d["candidates"] for d in result.details]
    scores = [d["candidate_rewards"] for d in result.details]
    return best_worst_pairs(prompts, groups, scores, min_gap, n), result


def recommended_options(n: int, alpha: float = 0.005) -> dict:
    """loss_options for `alignkit bonbon` on best-vs-worst-of-n pairs (alpha: the official README's value)."""
    return {"alpha": alpha, "beta": bonbon_beta(n)}
