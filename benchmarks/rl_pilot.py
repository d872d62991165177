"""The pilot behind `alignkit rl`'s constraint types: how often SmolLM2-135M-Instruct meets each constraint type
on its own, before any training.

    python benchmarks/rl_pilot.py                 # 8 single-constraint prompts per type x 4 samples, 64 new tokens

Each prompt is a seeded topic task followed by one constraint's instruction (rewards/verifiable/prompts.py), answered
at the rollouts' temperature 1 with the fast engine's bf16 weights. Types met 5-60 % of the time have room to improve
and a signal to learn from; the recipe keeps those (recipes/rl.py TYPES). Writes benchmarks/results/rl_pilot.{json,md}.
Not run in CI."""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts-per-type", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()

    from alignkit.config import SamplingOptions
    from alignkit.generate.sample import sample
    from alignkit.models.resolve import load_model_and_tokenizer
    from alignkit.recipes.rl import TYPES
    from alignkit.rewards.verifiable.constraints import CHECKERS, check_all
    from alignkit.rewards.verifiable.prompts import TOPICS, make_record

    model, tokenizer = load_model_and_tokenizer(args.model)
    rng = random.Random(1)
    records = [make_record(rng, rng.choice(TOPICS), (kind,)) for kind in CHECKERS
               for _ in range(args.prompts_per_type)]
    cfg = SamplingOptions(max_new_tokens=args.max_new_tokens, temperature=1.0, batch_size=48, engine="fast",
                          engine_precision="bf16")
    tic = time.perf_counter()
    texts = sample(model, tokenizer, [r["prompt"] for r in records], cfg, args.samples)
    seconds = time.perf_counter() - tic
    met: dict[str, list[bool]] = {}
    for record, group in zip(records, texts):
        met.setdefault(record["constraints"][0]["type"], []).extend(check_all(record["constraints"], t)[0]
                                                                     for t in group)
    rates = {kind: sum(v) / len(v) for kind, v in met.items()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "rl_pilot.json").write_text(json.dumps({"args": vars(args), "rates": rates, "seconds": seconds,
                                                       "kept": list(TYPES)}, indent=2))
    lines = ["# Base compliance per constraint type (SmolLM2-135M-Instruct, before training)", "",
             f"`python benchmarks/rl_pilot.py` — {args.prompts_per_type} prompts x {args.samples} samples per type, "
             f"temperature 1, <= {args.max_new_tokens} new tokens, {seconds:.0f} s.", "",
             "| type | met | kept by `alignkit rl` |", "|---|---:|---|"]
    lines += [f"| {kind} | {rate:.0%} | {'yes' if kind in TYPES else ''} |" for kind, rate in rates.items()]
    (RESULTS / "rl_pilot.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
