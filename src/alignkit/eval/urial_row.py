"""The training-free baseline row of `alignkit eval --urial true`: the baseline model (or `urial_model`) prompted with
URIAL's in-context examples (generate/presets.py, arXiv 2312.01552) on A's prompts, with A's sampling and seed, so
the tables say whether training beat in-context alignment. The comparison itself is evaluate_responses'."""

from __future__ import annotations

from alignkit.config import SamplingOptions
from alignkit.errors import ConfigError
from alignkit.generate.presets import apply_preset
from alignkit.generate.sample import sample

URIAL_TITLES = {"urial": "Reward (A vs the URIAL baseline, training-free)",
                "judge_urial": "Win rate of A over the URIAL baseline under the judge (both orders)",
                "length_urial": "Length of the URIAL baseline's responses"}


def urial_model_name(cfg) -> str | None:
    """The model the URIAL row prompts (`urial_model`, else the baseline); None when the row is off. Checked
    before any model loads."""
    if not cfg.urial:
        if cfg.urial_model:
            raise ConfigError("urial_model", "is set but urial is false; add --urial true for the URIAL row")
        return None
    name = cfg.urial_model or cfg.baseline
    if not name:
        raise ConfigError("urial", "the URIAL row prompts a base model: pass --baseline BASE_DIR (or --urial_model "
                                   "BASE_DIR)")
    return name


def urial_responses(model, tokenizer, prompts: list, sampling: SamplingOptions, seed: int) -> list[str]:
    """One answer per prompt, sampled as `alignkit generate --preset urial` samples it."""
    wrapped, urial_sampling = apply_preset("urial", prompts, sampling)
    return [s[0] for s in sample(model, tokenizer, wrapped, urial_sampling, seed=seed)]


def urial_label(name: str) -> str:
    return f"{name} + URIAL (training-free)"


def baselines_table(summary: dict, names: tuple[str, str]) -> list[list[str]]:
    """One row per baseline A was compared with (B, B + URIAL): its mean reward, A's paired gain over it with the
    95% bootstrap interval, A's reward and judge win rates over it, its length."""
    rows = [["baseline", "mean reward", "A's gain [95% CI]", "A's reward win rate", "A's judge win rate (calibrated)",
             "words (mean)", "tokens (mean)"]]
    compared = [(names[1], summary["reward"], "mean_b", "judge", "length_b")] if "rewards_b" in summary else []
    if "urial" in summary:
        compared.append((urial_label(summary["urial"]["model"]), summary["urial"], "mean_urial", "judge_urial",
                         "length_urial"))
    for label, reward, mean_key, judge_key, length_key in compared:
        length = summary[length_key]
        rows.append([label, f"{reward[mean_key]:+.4f}",
                     f"{reward['gain']:+.4f} [{reward['gain_ci_low']:+.4f}, {reward['gain_ci_high']:+.4f}]",
                     f"{reward['win_rate']:.3f}", f"{summary[judge_key]['win_rate_calibrated']:.3f}",
                     f"{length['words_mean']:.1f}", f"{length['tokens_mean']:.1f}" if "tokens_mean" in length else ""])
    return rows
