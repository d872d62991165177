"""The quickstart: a tiny model learns the synthetic review task (SFT), then DPO makes it positive; and
`train_reward_model`, a tiny reward model learning the same task's preference pairs.

Everything is built here (tokenizer, model, data), so it needs no download and runs in about a minute."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from alignkit.config import SamplingOptions, TrainConfig
from alignkit.data.load import write_jsonl_atomic
from alignkit.data.synthetic import (
    VOCABULARY,
    preference_records,
    prompt_records,
    sentiment_reward,
    sft_records,
)
from alignkit.eval.plots import plot_curves
from alignkit.generate.sample import sample
from alignkit.models.tiny import build_tiny_model, build_tiny_reward_model, build_word_tokenizer
from alignkit.rewards.model import RewardModelScorer, pair_accuracy
from alignkit.train.logging import read_metrics
from alignkit.train.loop import train


@dataclass
class QuickstartSize:
    sft_examples: int = 2000
    train_pairs: int = 2000
    eval_pairs: int = 200
    eval_prompts: int = 128
    sft_epochs: int = 2
    dpo_epochs: int = 1
    hidden: int = 96
    layers: int = 2


def mean_sample_reward(model, tokenizer, prompts: list[str], seed: int) -> tuple[float, list[str]]:
    sampling = SamplingOptions(max_new_tokens=12, temperature=1.0, batch_size=64)
    completions = sample(model, tokenizer, prompts, sampling, seed=seed)
    texts = [c[0] for c in completions]
    return sum(sentiment_reward(t) for t in texts) / len(texts), texts


def run_quickstart(out: str | Path = "runs/quickstart", size: QuickstartSize | None = None, seed: int = 0,
                   progress: bool = True, console: Console | None = None) -> dict:
    size = size or QuickstartSize()
    console = console or Console()
    out = Path(out)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(data / "sft.jsonl", sft_records(size.sft_examples, seed))
    write_jsonl_atomic(data / "pairs_train.jsonl", preference_records(size.train_pairs, seed + 1))
    write_jsonl_atomic(data / "pairs_eval.jsonl", preference_records(size.eval_pairs, seed + 2))
    prompts = [r["prompt"] for r in prompt_records(size.eval_prompts, seed + 3)]

    tokenizer = build_word_tokenizer(VOCABULARY)
    model = build_tiny_model("llama", len(tokenizer), seed=seed, hidden=size.hidden, layers=size.layers)
    common = dict(max_length=64, max_tokens_per_batch=2048, max_tokens_per_row=1024, seed=seed, progress=progress)

    console.print(f"[bold]1/2 SFT[/] tiny Llama ({sum(p.numel() for p in model.parameters()):,} params)")
    sft_cfg = TrainConfig(model="tiny", train_data=str(data / "sft.jsonl"), loss="sft", learning_rate=3e-3,
                          warmup_steps=5, epochs=size.sft_epochs, output_dir=str(out / "sft"), **common)
    model = train(sft_cfg, model, tokenizer).model
    sft_reward, sft_texts = mean_sample_reward(model, tokenizer, prompts, seed)

    console.print("[bold]2/2 DPO[/] against the SFT model as reference")
    dpo_cfg = TrainConfig(model="tiny", train_data=str(data / "pairs_train.jsonl"), eval_data=str(data / "pairs_eval.jsonl"),
                          loss="dpo", loss_options={"beta": 0.25}, learning_rate=5e-4, warmup_steps=2,
                          epochs=size.dpo_epochs, eval_every=5, ref_cache=False, output_dir=str(out / "dpo"), **common)
    result = train(dpo_cfg, model, tokenizer)
    dpo_reward, dpo_texts = mean_sample_reward(result.model, tokenizer, prompts, seed)

    rows = read_metrics(out / "dpo")
    evals = [r for r in rows if "eval/rewards/accuracy" in r]
    summary = {
        "heldout_pref_accuracy_before": 0.5,  # policy == reference: every margin is 0, a tie counts half
        "heldout_pref_accuracy_after": evals[-1]["eval/rewards/accuracy"],
        "sample_reward_sft": sft_reward,
        "sample_reward_dpo": dpo_reward,
        "examples_sft": sft_texts[:3],
        "examples_dpo": dpo_texts[:3],
    }
    curve = [{"step": 0, "eval/rewards/accuracy": 0.5, "eval/rewards/margins": 0.0}] + evals
    plot_curves({"dpo": rows}, ["loss", "rewards/margins"], out / "train_curves.png", "DPO training")
    plot_curves({"held-out": curve}, ["eval/rewards/accuracy", "eval/rewards/margins"], out / "eval_curves.png",
                "DPO held-out preference accuracy")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))

    table = Table(title="quickstart: SFT -> DPO on the synthetic review task")
    table.add_column("metric")
    table.add_column("after SFT", justify="right")
    table.add_column("after DPO", justify="right")
    table.add_row("held-out preference accuracy", f"{summary['heldout_pref_accuracy_before']:.1%}",
                  f"{summary['heldout_pref_accuracy_after']:.1%}")
    table.add_row("mean sentiment reward of samples", f"{sft_reward:+.3f}", f"{dpo_reward:+.3f}")
    console.print(table)
    for before, after in zip(sft_texts[:3], dpo_texts[:3]):
        console.print(f"  SFT: {before!r}\n  DPO: {after!r}")
    console.print(f"curves: {out / 'train_curves.png'}, {out / 'eval_curves.png'}")
    return summary


@dataclass
class RewardModelSize:
    train_pairs: int = 1000
    eval_pairs: int = 300
    epochs: int = 1
    hidden: int = 64
    layers: int = 2
    learning_rate: float = 3e-3
    max_tokens_per_batch: int = 1024


def train_reward_model(out: str | Path = "runs/quickstart", size: RewardModelSize | None = None, seed: int = 0,
                       progress: bool = True, console: Console | None = None) -> dict:
    """Train a tiny reward model (Llama backbone + score head, `loss: rm`) on the synthetic task's preference pairs
    and report how often it ranks held-out pairs as the programmatic reward (sentiment_reward) does: on pairs like
    the training ones (a gap of at least 2 sentiment words) and on harder ones (a gap of 1 word).
    Writes <out>/data/rm_pairs_*.jsonl, the model to <out>/rm/final and <out>/rm_summary.json."""
    size = size or RewardModelSize()
    console = console or Console()
    out = Path(out)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(data / "rm_pairs_train.jsonl", preference_records(size.train_pairs, seed + 1))
    write_jsonl_atomic(data / "rm_pairs_eval.jsonl", preference_records(size.eval_pairs, seed + 2))
    write_jsonl_atomic(data / "rm_pairs_eval_gap1.jsonl", preference_records(size.eval_pairs, seed + 4, min_gap_words=1))

    tokenizer = build_word_tokenizer(VOCABULARY)
    model = build_tiny_reward_model("llama", len(tokenizer), seed=seed, hidden=size.hidden, layers=size.layers)
    console.print(f"[bold]reward model[/] tiny Llama + score head ({sum(p.numel() for p in model.parameters()):,} params)")
    cfg = TrainConfig(model="tiny", train_data=str(data / "rm_pairs_train.jsonl"), loss="rm",
                      learning_rate=size.learning_rate, warmup_steps=2, epochs=size.epochs, max_length=64,
                      max_tokens_per_batch=size.max_tokens_per_batch, max_tokens_per_row=1024, seed=seed,
                      progress=progress, output_dir=str(out / "rm"))
    result = train(cfg, model, tokenizer)
    scorer = RewardModelScorer.from_model(result.model, tokenizer, max_length=64)
    heldout = pair_accuracy(scorer, data / "rm_pairs_eval.jsonl")
    gap1 = pair_accuracy(scorer, data / "rm_pairs_eval_gap1.jsonl")
    summary = {
        "heldout_accuracy": heldout["accuracy"],
        "heldout_margin": heldout["margin"],
        "heldout_accuracy_gap1": gap1["accuracy"],
        "train_pairs": size.train_pairs,
        "eval_pairs": heldout["pairs"],
        "model_dir": str(result.output_dir / "final"),
    }
    (out / "rm_summary.json").write_text(json.dumps(summary, indent=2))
    table = Table(title="reward model vs the programmatic reward's ranking (held-out pairs)")
    table.add_column("held-out pairs")
    table.add_column("accuracy", justify="right")
    table.add_row("gap >= 2 sentiment words (as in training)", f"{heldout['accuracy']:.1%}")
    table.add_row("gap = 1 word and more", f"{gap1['accuracy']:.1%}")
    console.print(table)
    console.print(f"model: {summary['model_dir']} (alignkit rm-eval --model ... --data ...)")
    return summary
