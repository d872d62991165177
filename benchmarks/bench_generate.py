"""Generation throughput of the rollout engines against HF generate, on the real default model.

    python benchmarks/bench_generate.py                      # SmolLM2-135M-Instruct, 16 and 64 sequences x 64 tokens

Rollout-shaped batches: 4 samples per prompt of the shipped align prompts (chat template), temperature 1, at most 64
new tokens. Each (engine, precision, size) runs in its own process after one warm-up call; tokens/s counts the
tokens actually generated (samples that stop early generate fewer). Also checks, per precision, that greedy decoding
gives HF's tokens and how far the fast engine's log-probs are from the trainer's log-softmax on the sampled tokens.
Writes benchmarks/results/generate.{json,md,png}. Not run in CI."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

from contenders import machine

RESULTS = Path(__file__).parent / "results"
CONTENDERS = [("hf", "fp32"), ("fast", "fp32"), ("hf", "bf16"), ("fast", "bf16")]


def load(model_name: str):
    from alignkit.data.load import load_records
    from alignkit.models.resolve import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(model_name)
    source = resources.files("alignkit") / "assets" / "align_prompts.jsonl"
    prompts = [r["prompt"] for r in load_records(str(source), shape="prompts")]
    return model, tokenizer, prompts


def engine_for(name: str, precision: str, model, tokenizer):
    import torch

    from alignkit.generate.engines import HFEngine
    from alignkit.generate.engines.fast import FastEngine

    if name == "fast":
        return FastEngine(model, tokenizer, dtype=precision)
    if precision == "bf16":
        model.to(torch.bfloat16)
    return HFEngine(model, tokenizer)


def run_one(args) -> dict:
    """One contender in this process: warm-up, then `repeats` timed calls; the fastest is reported."""
    import torch

    from alignkit.config import SamplingOptions
    from alignkit.generate.engines import encode_prompts

    torch.set_num_threads(args.threads)
    model, tokenizer, prompts = load(args.model)
    engine = engine_for(args.engine, args.precision, model, tokenizer)
    ids = encode_prompts(tokenizer, prompts[:args.sequences // 4])
    cfg = SamplingOptions(max_new_tokens=args.new_tokens, temperature=1.0, batch_size=len(ids))
    engine.generate(ids[:2], SamplingOptions(max_new_tokens=4), 2)  # warm-up
    best = None
    for repeat in range(args.repeats):
        tic = time.perf_counter()
        out = engine.generate(ids, cfg, 4, repeat)
        seconds = time.perf_counter() - tic
        tokens = sum(len(s) for row in out.ids for s in row)
        if best is None or tokens / seconds > best["tokens_per_s"]:
            best = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}
    return best


def exactness(model_name: str, threads: int) -> dict:
    """Greedy tokens of the fast engine against HF's, and its log-probs against the trainer's, per precision."""
    import torch

    from alignkit.config import SamplingOptions
    from alignkit.generate.engines import HFEngine, encode_prompts
    from alignkit.generate.engines.fast import FastEngine
    from alignkit.online.rollout import RolloutShape, generate_rollout
    from alignkit.train.packing import Packing
    from alignkit.train.reference import score_examples

    torch.set_num_threads(threads)
    model, tokenizer, prompts = load(model_name)
    ids = encode_prompts(tokenizer, prompts[:8])
    greedy = SamplingOptions(max_new_tokens=32, temperature=0, batch_size=8)
    out = {}
    for precision in ("fp32", "bf16"):
        fast = FastEngine(model, tokenizer, dtype=precision)
        hf_model = model if precision == "fp32" else model.to(torch.bfloat16)
        same = HFEngine(hf_model, tokenizer).generate(ids, greedy).ids == fast.generate(ids, greedy).ids
        model.to(torch.float32)
        rollout = generate_rollout(fast, tokenizer, prompts[:8], lambda p, r: [0.0] * len(r),
                                   SamplingOptions(max_new_tokens=32), RolloutShape(4, 1024, seed=1))
        _, trainer = score_examples(model, rollout.examples, Packing(4096, None, tokenizer.pad_token_id or 0))
        gaps = torch.cat([(e - t).abs() for e, t in zip(rollout.engine_logps, trainer)])
        out[precision] = {"greedy_equal_hf": same, "logp_gap_mean": float(gaps.mean()), "logp_gap_max": float(gaps.max())}
    return out


def markdown(rows: list[dict], checks: dict, header: dict) -> str:
    lines = [f"# Generation: engines against HF generate ({header['model']})", "",
             f"{header['machine']}; torch {header['torch']}, {header['threads']} threads; 4 samples per prompt, "
             f"temperature 1, at most {header['new_tokens']} new tokens; fastest of {header['repeats']} calls after a "
             f"warm-up. Command: `{header['command']}`", "",
             "| engine | precision | sequences | tokens | seconds | tokens/s | vs HF fp32 |", "|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['engine']} | {row['precision']} | {row['sequences']} | {row['tokens']} | "
                     f"{row['seconds']:.2f} | {row['tokens_per_s']:.0f} | {row['vs_hf_fp32']:.2f}x |")
    lines += ["", "| precision | fast greedy == HF greedy | mean \\|log p engine − log p trainer\\| | max |",
              "|---|---|---:|---:|"]
    for precision, c in checks.items():
        lines.append(f"| {precision} | {c['greedy_equal_hf']} | {c['logp_gap_mean']:.2e} | {c['logp_gap_max']:.2e} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["sequences"] for r in rows})
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(CONTENDERS)
    for i, (engine, precision) in enumerate(CONTENDERS):
        values = [next((r["tokens_per_s"] for r in rows if (r["engine"], r["precision"], r["sequences"]) ==
                        (engine, precision, s)), 0) for s in sizes]
        ax.bar([x + i * width for x in range(len(sizes))], values, width, label=f"{engine} {precision}")
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(sizes))], [f"{s} sequences" for s in sizes])
    ax.set_ylabel("tokens/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--sizes", default="16,64")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--one", nargs=3, metavar=("ENGINE", "PRECISION", "SEQUENCES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        args.engine, args.precision, args.sequences = args.one[0], args.one[1], int(args.one[2])
        print(json.dumps(run_one(args)))
        return
    rows = []
    for size in map(int, args.sizes.split(",")):
        for engine, precision in CONTENDERS:
            cmd = [sys.executable, __file__, "--model", args.model, "--new-tokens", str(args.new_tokens), "--repeats",
                   str(args.repeats), "--threads", str(args.threads), "--one", engine, precision, str(size)]
            result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            rows.append({"engine": engine, "precision": precision, "sequences": size, **result})
            print(rows[-1], flush=True)
    for row in rows:
        base = next(r for r in rows if r["sequences"] == row["sequences"] and (r["engine"], r["precision"]) == ("hf", "fp32"))
        row["vs_hf_fp32"] = row["tokens_per_s"] / base["tokens_per_s"]
    checks = exactness(args.model, args.threads)
    import torch

    header = {"model": args.model, "machine": machine(),
              "torch": torch.__version__, "threads": args.threads, "new_tokens": args.new_tokens,
              "repeats": args.repeats, "command": "python benchmarks/bench_generate.py " + " ".join(sys.argv[1:])}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "generate.json").write_text(json.dumps({"setup": header, "rows": rows, "exactness": checks}, indent=2))
    (RESULTS / "generate.md").write_text(markdown(rows, checks, header))
    plot(rows, RESULTS / "generate.png")
    print(markdown(rows, checks, header))


if __name__ == "__main__":
    main()
