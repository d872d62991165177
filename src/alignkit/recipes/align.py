"""The main job: align SmolLM2-135M-Instruct on CPU, end to end, and show what alignment achieved.

shipped prompts -> k samples per prompt from the model itself -> scored by a reward nobody here wrote
(VADER sentiment, plus length and format terms so rambling or cut-off answers do not win) -> best vs
worst pairs -> DPO -> held-out prompts answered by the original and the aligned model -> reward gain with
a bootstrap interval, win rate, length, distinct-2, examples -> table + PNG/HTML report."""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator
from rich.console import Console

from alignkit.config import SamplingOptions, Strict, TrainConfig, load_command_config
from alignkit.data.load import load_records, write_jsonl_atomic
from alignkit.data.pairs import best_worst_pairs
from alignkit.eval.metrics import bootstrap_mean_ci, distinct_n, mean_words, win_rate
from alignkit.eval.plots import plot_curves
from alignkit.eval.report import rich_table, write_html_report
from alignkit.generate.sample import sample
from alignkit.losses import loss_option_names
from alignkit.recipes.stages import Stages, with_recipe_defaults
from alignkit.rewards.base import score_groups
from alignkit.rewards.spec import default_reward  # noqa: F401 - the main job's reward, importable from here
from alignkit.rewards.text import VaderSentiment
from alignkit.train.logging import read_metrics
from alignkit.train.loop import train

# The DPO run: `alignkit train`'s keys with this job's defaults (model, seed, train_data and output_dir are the job's).
TRAIN = {"model": "smollm2-135m-instruct", "loss": "dpo", "loss_options": {"beta": 0.1}, "learning_rate": 3e-5,
         "warmup_steps": 2, "lr_schedule": "cosine", "epochs": 3, "max_length": 256, "max_tokens_per_batch": 1200,
         "precision": "bf16", "ref_cache": False}
SET_BY_RECIPE = ("model", "seed", "train_data", "output_dir")


class AlignConfig(Strict):
    model: str = "smollm2-135m-instruct"
    prompts: str | None = Field(None, description="JSONL of {'prompt': ...}; default: the shipped prompts")
    output_dir: str = "runs/align"
    num_train_prompts: int = Field(128, gt=0, description="prompts answered for the training pairs")
    num_eval_prompts: int = Field(64, gt=0, description="held-out prompts answered before and after")
    samples_per_prompt: int = Field(4, ge=2)
    sampling: SamplingOptions = Field(
        default_factory=lambda: SamplingOptions(max_new_tokens=32, temperature=0.8, top_p=0.95, batch_size=48,
                                                engine_precision="bf16"),
        description="how the answers are sampled (the fast engine with bf16 weights: this job trains on the texts, "
                    "not on the engine's log-probs)")
    min_reward_gap: float = Field(0.1, ge=0, description="pairs whose best-worst gap is smaller are dropped")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(**TRAIN),
                               description="the DPO run: train's keys (--learning_rate, --beta, ... reach it too)")
    seed: int = 0

    @field_validator("train", mode="before")
    @classmethod
    def _job_defaults(cls, values):
        return with_recipe_defaults(values, TRAIN, "train", SET_BY_RECIPE)


def _option_names(values: dict) -> set[str]:
    """The DPO loss's options (--beta), given at the top level."""
    train = values.get("train") if isinstance(values.get("train"), dict) else {}
    return loss_option_names(train.get("loss", TRAIN["loss"]))


def build_pairs(prompts: list, samples: list[list[str]], reward, min_gap: float) -> tuple[list[dict], list[float]]:
    """Best vs worst of each prompt's samples, by reward; prompts whose gap is below min_gap (or 0) give no pair."""
    scores = score_groups(reward, prompts, samples)
    pairs = [{k: v for k, v in p.items() if k != "n"} for p in best_worst_pairs(prompts, samples, scores, min_gap)]
    return pairs, [s for group in scores for s in group]


def run_align(config: str | Path | None = None, overrides: dict[str, Any] | None = None,
              console: Console | None = None) -> dict:
    cfg: AlignConfig = load_command_config(AlignConfig, config, overrides, _option_names)
    console = console or Console()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages(console)
    tic = time.perf_counter()

    from alignkit.models.resolve import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(cfg.model)
    stages.seconds["load model"] = time.perf_counter() - tic
    source = cfg.prompts or str(resources.files("alignkit") / "assets" / "align_prompts.jsonl")
    prompts = [r["prompt"] for r in load_records(source, shape="prompts")]
    if len(prompts) < cfg.num_train_prompts + cfg.num_eval_prompts:
        raise ValueError(f"{source} has {len(prompts)} prompts; need num_train_prompts + num_eval_prompts")
    eval_prompts = prompts[:cfg.num_eval_prompts]
    train_prompts = prompts[cfg.num_eval_prompts:cfg.num_eval_prompts + cfg.num_train_prompts]
    reward = default_reward()
    sampling = cfg.sampling

    before = stages.run("answer held-out prompts (original)", lambda: [s[0] for s in sample(model, tokenizer, eval_prompts, sampling, seed=cfg.seed)])
    samples = stages.run(f"sample {cfg.samples_per_prompt} answers x {len(train_prompts)} prompts",
                    lambda: sample(model, tokenizer, train_prompts, sampling, cfg.samples_per_prompt, cfg.seed))
    pairs, _ = build_pairs(train_prompts, samples, reward, cfg.min_reward_gap)
    write_jsonl_atomic(out / "pairs.jsonl", pairs)
    console.print(f"{len(pairs)} preference pairs (best vs worst of {cfg.samples_per_prompt})")
    train_cfg = cfg.train.model_copy(update={"model": cfg.model, "seed": cfg.seed, "train_data": str(out / "pairs.jsonl"),
                                             "output_dir": str(out / "dpo")})
    stages.run("DPO", lambda: train(train_cfg, model, tokenizer))
    after = stages.run("answer held-out prompts (aligned)", lambda: [s[0] for s in sample(model, tokenizer, eval_prompts, sampling, seed=cfg.seed)])
    summary = evaluate_before_after(eval_prompts, before, after, reward)
    summary["pairs"] = len(pairs)
    summary["timings_s"] = stages.seconds
    summary["run_s"] = time.perf_counter() - tic
    write_report(out, summary, eval_prompts, before, after, console)
    return summary


def evaluate_before_after(prompts, before: list[str], after: list[str], reward) -> dict:
    r_before, r_after = reward(prompts, before), reward(prompts, after)
    gain, low, high = bootstrap_mean_ci([a - b for a, b in zip(r_after, r_before)])
    sentiment = VaderSentiment()
    return {
        "reward_before": sum(r_before) / len(r_before), "reward_after": sum(r_after) / len(r_after),
        "reward_gain": gain, "reward_gain_ci95": [low, high],
        "win_rate": win_rate(r_after, r_before),
        "sentiment_before": sum(sentiment(prompts, before)) / len(before),
        "sentiment_after": sum(sentiment(prompts, after)) / len(after),
        "words_before": mean_words(before), "words_after": mean_words(after),
        "distinct2_before": distinct_n(before, 2), "distinct2_after": distinct_n(after, 2),
        "rewards_before": r_before, "rewards_after": r_after,
    }


def write_report(out: Path, s: dict, prompts, before, after, console: Console) -> None:
    rows = [
        ["metric", "original", "aligned", "change"],
        ["mean reward (held-out)", f"{s['reward_before']:+.3f}", f"{s['reward_after']:+.3f}",
         f"{s['reward_gain']:+.3f}  95% CI [{s['reward_gain_ci95'][0]:+.3f}, {s['reward_gain_ci95'][1]:+.3f}]"],
        ["VADER sentiment", f"{s['sentiment_before']:+.3f}", f"{s['sentiment_after']:+.3f}",
         f"{s['sentiment_after'] - s['sentiment_before']:+.3f}"],
        ["win rate of aligned over original", "", f"{s['win_rate']:.1%}", ""],
        ["mean words per answer", f"{s['words_before']:.1f}", f"{s['words_after']:.1f}", ""],
        ["distinct-2", f"{s['distinct2_before']:.3f}", f"{s['distinct2_after']:.3f}",
         f"{s['distinct2_after'] / max(s['distinct2_before'], 1e-9) - 1:+.1%}"],
    ]
    console.print(rich_table(f"SmolLM2-135M-Instruct aligned with DPO on {s['pairs']} self-generated pairs "
                             f"({s['run_s'] / 60:.1f} min)", rows))
    examples = [{"prompt": p[-1]["content"] if isinstance(p, list) else p, "original": b, "aligned": a}
                for p, b, a in list(zip(prompts, before, after))[:6]]
    for e in examples[:3]:
        console.print(f"[bold]{e['prompt']}[/]\n  original: {e['original']}\n  aligned:  {e['aligned']}")
    images = [_reward_histogram(out / "rewards.png", s["rewards_before"], s["rewards_after"])]
    train_rows = read_metrics(out / "dpo")
    images.append(plot_curves({"dpo": train_rows}, ["loss", "rewards/margins", "rewards/accuracy"],
                              out / "train_curves.png", "DPO training"))
    (out / "summary.json").write_text(json.dumps(s, indent=2))
    timing_rows = [["stage", "seconds"]] + [[k, f"{v:.1f}"] for k, v in s["timings_s"].items()]
    write_html_report(out / "report.html", "alignkit: SmolLM2-135M-Instruct before and after DPO",
                      {"Held-out results": rows, "Time": timing_rows}, images, examples)
    console.print(f"report: {out / 'report.html'}  (numbers: {out / 'summary.json'})")


def _reward_histogram(path: Path, before: list[float], after: list[float]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4))
    bins = 20
    ax.hist(before, bins=bins, alpha=0.6, label=f"original (mean {sum(before) / len(before):+.2f})")
    ax.hist(after, bins=bins, alpha=0.6, label=f"aligned (mean {sum(after) / len(after):+.2f})")
    ax.set_xlabel("reward on held-out prompts")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
