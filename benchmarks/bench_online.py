"""Online methods on the synthetic review task: where the time goes (rollout = generation + reward, scoring = the
reference's / behaviour policy's forward passes, learner = forward + backward + optimizer) and samples per second.

    python benchmarks/bench_online.py                       # hidden 256, 4 layers (~2.6M params), ~3 min on 2 cores
    python benchmarks/bench_online.py --hidden 64 --layers 2 --rounds 10 --prompts-per-round 16   # the tests' size

Each method starts from the same SFT'd model (built and trained here: no download) and runs the same rounds with the
same seeds. Writes benchmarks/results/online_<hidden>x<layers>.{json,md}. Not run in CI."""

from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

from alignkit.config import TrainConfig
from alignkit.data.load import write_jsonl_atomic
from alignkit.data.synthetic import VOCABULARY, prompt_records, sentiment_reward, sft_records
from alignkit.models.tiny import build_tiny_model, build_word_tokenizer
from alignkit.online import OnlineInputs, online_config, run_online
from alignkit.rewards.base import FunctionReward, Reward
from alignkit.train.loop import train

METHODS = ("grpo", "rloo", "ppo", "online-dpo", "self-reward")
RESULTS = Path(__file__).parent / "results"


class NoisyJudge(Reward):
    """The self-reward judge stand-in (a tiny model cannot follow the judge prompt): the task's reward plus noise."""

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)

    def score(self, prompts, responses):
        return [sentiment_reward(r) + self.rng.gauss(0, 0.1) for r in responses]


def sft_model(args, work: Path):
    tokenizer = build_word_tokenizer(VOCABULARY)
    model = build_tiny_model("llama", len(tokenizer), seed=0, hidden=args.hidden, layers=args.layers,
                             heads=max(4, args.hidden // 64))
    write_jsonl_atomic(work / "sft.jsonl", sft_records(args.sft_examples, seed=0))
    cfg = TrainConfig(model="tiny", train_data=str(work / "sft.jsonl"), loss="sft", learning_rate=3e-3, warmup_steps=5,
                      epochs=2, max_length=64, max_tokens_per_batch=2048, max_tokens_per_row=1024, progress=False,
                      output_dir=str(work / "sft"))
    return train(cfg, model, tokenizer).model, tokenizer


def run_method(method: str, model, tokenizer, args, work: Path) -> dict:
    options = {"self-reward": {"consistency": "kendall", "epochs": 2, "learning_rate": args.lr / 2}}.get(method, {})
    cfg = online_config({
        "method": method, "model": "tiny", "prompts": "-", "output_dir": str(work / method), "rounds": args.rounds,
        "prompts_per_round": args.prompts_per_round, "num_samples": args.samples, "max_new_tokens": 16,
        "max_length": 64, "learning_rate": args.lr, "sampling.batch_size": args.prompts_per_round,
        "max_tokens_per_batch": 4096, "max_tokens_per_row": 1024, "eval_samples": 2, "progress": False, **options})
    reward = FunctionReward(lambda prompt, response: sentiment_reward(response), name="synthetic")
    tic = time.perf_counter()
    inputs = OnlineInputs([r["prompt"] for r in prompt_records(512, 21)], [r["prompt"] for r in prompt_records(64, 22)],
                          reward, NoisyJudge() if method == "self-reward" else None)
    result = run_online(cfg, copy.deepcopy(model), tokenizer, inputs)
    s = result.summary
    return {"method": method, "wall_s": time.perf_counter() - tic, "rounds_s": s["seconds"],
            "samples": s["samples"], "samples_per_s": s["samples_per_s"], "time_split": s["time_split"],
            "cpu_ms_per_sample": 1000 * s["cpu_seconds"] / s["samples"],
            "generated_tokens": sum(r["generated_tokens"] for r in result.rounds),
            "reward_start": s["reward_start"], "reward_final": s["reward_final"], "kl_to_start": s["kl_to_start"]}


def markdown(rows: list[dict], header: dict) -> str:
    lines = [f"model: tiny Llama hidden {header['hidden']}, {header['layers']} layers ({header['params']:,} params), "
             f"{header['rounds']} rounds x {header['prompts_per_round']} prompts x {header['samples']} samples, "
             f"max 16 new tokens, torch threads {header['threads']}", "",
             "| method | samples/s | CPU ms/sample | generate | reward | scoring | learner | reward start → final "
             "| KL to start |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        split = r["time_split"]
        lines.append(f"| {r['method']} | {r['samples_per_s']:.0f} | {r['cpu_ms_per_sample']:.1f} | "
                     f"{split['generate']:.0%} | {split['reward']:.0%} | "
                     f"{split['score']:.0%} | {split['learner']:.0%} | {r['reward_start']:+.3f} → "
                     f"{r['reward_final']:+.3f} | {r['kl_to_start']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--sft-examples", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--prompts-per-round", type=int, default=32)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="alignkit-bench-online-"))
    tic = time.perf_counter()
    model, tokenizer = sft_model(args, work)
    header = {"hidden": args.hidden, "layers": args.layers, "params": sum(p.numel() for p in model.parameters()),
              "rounds": args.rounds, "prompts_per_round": args.prompts_per_round, "samples": args.samples,
              "threads": args.threads, "sft_s": time.perf_counter() - tic, "torch": torch.__version__,
              "machine": platform.processor() or platform.machine()}
    rows = []
    for method in args.methods.split(","):
        rows.append(run_method(method, model, tokenizer, args, work))
        print(markdown(rows[-1:], header).splitlines()[-1], flush=True)
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"online_{args.hidden}x{args.layers}"
    stem.with_suffix(".json").write_text(json.dumps({"setup": header, "methods": rows}, indent=2))
    stem.with_suffix(".md").write_text(markdown(rows, header))
    print(markdown(rows, header))
    print(f"wrote {stem}.json and .md")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
