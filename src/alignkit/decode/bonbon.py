"""BoNBoN training data (arXiv 2406.00832): per prompt, the best and the worst of n samples from the reference
policy form a (chosen, rejected) pair. The pairs JSONL trains with `alignkit bonbon` (losses/bonbon.py:
alpha * SFT on the best + (1 - alpha) * IPO at the best-of-n matching beta) or any pairs loss (`alignkit dpo`)."""

from __future__ import annotations

from pydantic import Field

from alignkit.config import SamplingOptions, Strict
from alignkit.data.pairs import best_worst_pairs
from alignkit.decode.base import DecodeResult
from alignkit.decode.bon import BoNOptions, best_of_n
from alignkit.losses.bonbon import bonbon_beta


class BonBonPairsOptions(Strict):
    num_samples: int = Field(8, ge=2, description="samples per prompt; the best and the worst form a pair")
    min_gap: float = Field(0.0, ge=0, description="smallest best-worst reward gap kept")
    seed: int = Field(0, description="of the sampling")


def bonbon_pairs(model, tokenizer, prompts: list, reward, opts: BonBonPairsOptions,
                 sampling: SamplingOptions) -> tuple[list[dict], DecodeResult]:
    """(pairs records, the best-of-n result they came from). Train them with loss 'bonbon' and
    beta = bonbon_beta(n), which `recommended_options(n)` returns."""
    n = opts.num_samples
    result = best_of_n(model, tokenizer, prompts, reward, BoNOptions(num_samples=n, seed=opts.seed), sampling)
    groups = [d["candidates"] for d in result.details]
    scores = [d["candidate_rewards"] for d in result.details]
    return best_worst_pairs(prompts, groups, scores, opts.min_gap, n), result


def recommended_options(n: int, alpha: float = 0.005) -> dict:
    """loss_options for `alignkit bonbon` on best-vs-worst-of-n pairs (alpha: the official README's value)."""
    return {"alpha": alpha, "beta": bonbon_beta(n)}
