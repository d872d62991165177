"""Online GRPO against TRL 1.16's GRPOTrainer, side by side, on the real default model.

    python benchmarks/bench_grpo.py                 # SmolLM2-135M-Instruct, 4 prompts x 4 samples, <= 64 new tokens

The same settings for every contender: the shipped align prompts (chat template), VADER compound as the reward,
k = 4 samples per prompt, 4 prompts per step, at most 64 new tokens, temperature 1, beta 0.04, lr 1e-6, no gradient
checkpointing, no vLLM, TRL's loss_type "grpo". Each contender runs in its own process: 1 warm-up step, then
`--steps` timed. Reported: s/step, samples/s, peak RSS (the process's maximum resident set), the split between
generation, scoring and learning (alignkit's own per-round timers; TRL's steps are timed whole) and the mean reward
of each step's samples. Writes benchmarks/results/grpo.{json,md,png}. Not run in CI (needs trl: `.[bench]`)."""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

from contenders import machine, print_result, run_in_own_process

RESULTS = Path(__file__).parent / "results"
# alignkit: fp32 throughout (the fast engine's default); _bf16_engine: bf16 engine weights; _bf16: bf16 engine and
# bf16 autocast training
# trl_bf16: TRL's bf16=True (autocast), the like-for-like anchor of alignkit_bf16
# alignkit_bf16_lean: alignkit_bf16 with selective_recompute (RMSNorm and SwiGLU keep only their inputs; no gradient
# checkpointing: every matmul output is kept); _lean_m: and AdamW's moments in bf16 (adam_moments: bf16); _lean_m1024:
# and 1024-token micro-batches
CONTENDERS = ("trl", "alignkit", "alignkit_bf16_engine", "alignkit_bf16", "alignkit_bf16_lean",
              "alignkit_bf16_lean_m", "alignkit_bf16_lean_m1024", "trl_bf16")
# alignkit contender -> (engine precision, training precision, selective_recompute, adam_moments, micro-batch tokens
# (None: --max-tokens-per-batch))
ALIGNKIT = {"alignkit": ("fp32", "fp32", False, "fp32", None),
            "alignkit_bf16_engine": ("bf16", "fp32", False, "fp32", None),
            "alignkit_bf16": ("bf16", "bf16", False, "fp32", None),
            "alignkit_bf16_lean": ("bf16", "bf16", True, "fp32", None),
            "alignkit_bf16_lean_m": ("bf16", "bf16", True, "bf16", None),
            "alignkit_bf16_lean_m1024": ("bf16", "bf16", True, "bf16", 1024)}


def prompts(n: int) -> list:
    from alignkit.data.load import load_records

    source = resources.files("alignkit") / "assets" / "align_prompts.jsonl"
    return [r["prompt"] for r in load_records(str(source), shape="prompts")][:n]


def vader_scores(texts: list[str]) -> list[float]:
    from alignkit.rewards.text import VaderSentiment

    return VaderSentiment().score([""] * len(texts), texts)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def run_trl(args, bf16: bool = False) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from alignkit.models.resolve import resolve_model

    torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    steps = args.steps + 1
    rows = [{"prompt": p if isinstance(p, list) else [{"role": "user", "content": p}]}
            for p in prompts(args.prompts * steps)]
    rewards: list[float] = []

    def reward(completions, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        scores = vader_scores(texts)
        rewards.append(sum(scores) / len(scores))
        return scores

    times = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            times.append(time.perf_counter())

    out = tempfile.mkdtemp()
    config = GRPOConfig(output_dir=out, per_device_train_batch_size=args.prompts * args.k, num_generations=args.k,
                        max_completion_length=args.new_tokens, temperature=1.0, beta=0.04, learning_rate=1e-6,
                        loss_type="grpo", max_steps=steps, logging_steps=1, report_to="none", use_cpu=True,
                        bf16=bf16, gradient_checkpointing=False, save_strategy="no", seed=0,
                        dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer, callbacks=[Clock()])
    start = time.perf_counter()
    trainer.train()
    marks = [start, *times]
    step_s = [b - a for a, b in zip(marks, marks[1:])][1:]  # without the warm-up step
    return {"s_per_step": sum(step_s) / len(step_s), "samples_per_s": args.prompts * args.k * len(step_s) / sum(step_s),
            "peak_rss_gb": peak_rss_gb(), "rewards": rewards[1:], "split": None}


def run_alignkit(args, engine_precision: str, precision: str = "fp32", selective: bool = False,
                 moments: str = "fp32", max_tokens: int | None = None) -> dict:
    import torch

    from alignkit.online import OnlineInputs, online_config, run_online
    from alignkit.rewards.base import FunctionReward

    torch.set_num_threads(args.threads)
    steps = args.steps + 1
    out = tempfile.mkdtemp()
    cfg = online_config({
        "method": "grpo", "model": args.model, "prompts": "-", "output_dir": out, "rounds": steps,
        "prompts_per_round": args.prompts, "num_samples": args.k, "max_new_tokens": args.new_tokens,
        "temperature": 1.0, "kl_coef": 0.04, "learning_rate": 1e-6, "eval_samples": 1, "progress": False,
        "max_length": 2048, "engine_precision": engine_precision, "precision": precision,
        "max_tokens_per_batch": max_tokens or args.max_tokens_per_batch, "selective_recompute": selective,
        "adam_moments": moments})
    reward = FunctionReward(lambda prompt, response: vader_scores([response])[0], name="vader")
    result = run_online(cfg, inputs=OnlineInputs(prompts(args.prompts * steps), prompts(1), reward))
    timed = result.rounds[1:]
    seconds = [r["time/generate_s"] + r["time/reward_s"] + r["time/score_s"] + r["time/learner_s"] for r in timed]
    split = {part: sum(r[f"time/{part}_s"] for r in timed) / sum(seconds)
             for part in ("generate", "reward", "score", "learner")}
    return {"s_per_step": sum(seconds) / len(seconds), "samples_per_s": args.prompts * args.k * len(seconds) / sum(seconds),
            "peak_rss_gb": peak_rss_gb(), "rewards": [r["rollout_reward"] for r in timed], "split": split,
            "engine_gap_mean": [r.get("engine_gap_mean") for r in timed]}


def markdown(rows: dict, header: dict) -> str:
    trl = rows.get("trl")
    lines = [f"# Online GRPO: alignkit against TRL {header['trl']} GRPOTrainer ({header['model']})", "",
             f"{header['machine']}; torch {header['torch']}, {header['threads']} threads; {header['prompts']} prompts x "
             f"k = {header['k']} per step, <= {header['new_tokens']} new tokens, temperature 1, beta 0.04, lr 1e-6, "
             f"VADER reward, no gradient checkpointing, no vLLM; 1 warm-up step, {header['steps']} timed, each "
             f"contender in its own process. Command: `{header['command']}`", "",
             "| contender | s/step | samples/s | vs TRL | peak RSS | vs TRL | vs TRL bf16 (samples/s, RSS) | generate "
             "| score | learn | mean reward |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    trl_bf16 = rows.get("trl_bf16")
    for name, r in rows.items():
        split = r["split"] or {}
        cells = [f"{100 * split[p]:.0f}%" if p in split else "–" for p in ("generate", "score", "learner")]
        like = (f"{r['samples_per_s'] / trl_bf16['samples_per_s']:.2f}x, {r['peak_rss_gb'] / trl_bf16['peak_rss_gb']:.2f}x"
                if trl_bf16 else "–")
        speed, rss = ((f"{r['samples_per_s'] / trl['samples_per_s']:.2f}x", f"{r['peak_rss_gb'] / trl['peak_rss_gb']:.2f}x")
                      if trl else ("–", "–"))  # a run without the fp32 anchor
        lines.append(f"| {name} | {r['s_per_step']:.2f} | {r['samples_per_s']:.2f} | {speed} | "
                     f"{r['peak_rss_gb']:.2f} GB | {rss} | {like} | {' | '.join(cells)} | "
                     f"{sum(r['rewards']) / len(r['rewards']):+.3f} |")
    return "\n".join(lines) + "\n"


def plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = list(rows)
    left.bar(names, [rows[n]["samples_per_s"] for n in names])
    left.set_ylabel("samples/s")
    for name in names:
        right.plot(range(1, len(rows[name]["rewards"]) + 1), rows[name]["rewards"], marker="o", label=name)
    right.set_xlabel("timed step")
    right.set_ylabel("mean reward of the step's samples")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--max-tokens-per-batch", type=int, default=4096,
                        help="alignkit's learner micro-batch (the step's gradient is the same at any size)")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--reuse", action="store_true", help="keep the other contenders of results/grpo.json")
    parser.add_argument("--out", default="grpo", help="results/<out>.md, .json and .png")
    parser.add_argument("--one", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        result = run_trl(args, args.one == "trl_bf16") if args.one.startswith("trl") else run_alignkit(
            args, *ALIGNKIT[args.one])
        print_result(result)
        return
    rows = {}
    if args.reuse and (RESULTS / f"{args.out}.json").exists():  # keep contenders an earlier run measured
        rows = json.loads((RESULTS / f"{args.out}.json").read_text())["contenders"]
    for name in args.contenders.split(","):
        rows[name] = run_in_own_process(__file__, name, args, skip=("reuse",))
        print(name, rows[name], flush=True)
    import torch
    import trl

    header = {"model": args.model, "machine": machine(),
              "torch": torch.__version__, "trl": trl.__version__, "threads": args.threads, "prompts": args.prompts,
              "k": args.k, "new_tokens": args.new_tokens, "steps": args.steps,
              "command": "python benchmarks/bench_grpo.py " + " ".join(sys.argv[1:])}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"setup": header, "contenders": rows}, indent=2))
    (RESULTS / f"{args.out}.md").write_text(markdown(rows, header))
    plot(rows, RESULTS / f"{args.out}.png")
    print(markdown(rows, header))


if __name__ == "__main__":
    main()
