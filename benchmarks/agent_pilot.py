"""The pilot behind `alignkit agent`'s environment: how often SmolLM2-135M-Instruct succeeds in each shipped
environment before any training, at the rollouts' temperature 1 with the fast engine's bf16 weights.

    python benchmarks/agent_pilot.py          # 16 training records x 4 conversations per environment

- self-correction (SCoRe): two attempts at a constraint prompt with the checkers' verdict between them; success:
  every constraint met on the second attempt;
- arithmetic tool use, two steps and one step: success: the exact answer, with the calculate tool at hand.

An environment the model succeeds in 5-60 % of the time has a signal to learn from and room to improve; the recipe
uses one of those (recipes/agent.py). Writes benchmarks/results/agent_pilot.{json,md}. Not run in CI."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def pilot(name: str, engine, tokenizer, args) -> dict:
    from alignkit.config import SamplingOptions
    from alignkit.envs import Limits, run_trajectories
    from alignkit.envs.arithmetic import ArithmeticTools, arithmetic_report, arithmetic_sets
    from alignkit.envs.self_correction import SelfCorrection, self_correction_report, self_correction_sets

    sampling = SamplingOptions(max_new_tokens=args.max_new_tokens, temperature=1.0, batch_size=64, engine="fast",
                               engine_precision="bf16")
    if name == "self-correction":
        records, make, report, turns = self_correction_sets(args.records, 8, 0)[0], SelfCorrection, \
            self_correction_report, 2
    else:
        steps = 2 if name == "arithmetic, two steps" else 1
        records, make, report, turns = arithmetic_sets(args.records, 8, 0, steps)[0], ArithmeticTools, \
            arithmetic_report, 3
    rows = [{**r, "_row": i + 1} for i, r in enumerate(records) for _ in range(args.samples)]
    tic = time.perf_counter()
    trajectories = run_trajectories(engine, tokenizer, [make() for _ in rows], rows, sampling,
                                    Limits(max_turns=turns, max_tokens=1024, require_reward=False))
    figures = report(trajectories)
    success = figures["second_all_met"] if name == "self-correction" else figures["accuracy"]
    return {"success": success, **figures, "seconds": time.perf_counter() - tic, "conversations": len(rows)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--records", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()

    from alignkit.config import SamplingOptions
    from alignkit.generate.engines import make_engine
    from alignkit.models.resolve import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(args.model)
    engine = make_engine(model, tokenizer, SamplingOptions(engine="fast", engine_precision="bf16"))
    names = ("self-correction", "arithmetic, two steps", "arithmetic, one step")
    rates = {name: pilot(name, engine, tokenizer, args) for name in names}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "agent_pilot.json").write_text(json.dumps({"args": vars(args), "rates": rates}, indent=2))
    lines = ["# Base success per shipped environment (SmolLM2-135M-Instruct, before training)", "",
             f"`python benchmarks/agent_pilot.py` — {args.records} records x {args.samples} conversations each, "
             f"temperature 1, <= {args.max_new_tokens} new tokens per turn.", "",
             "| environment | success | tool-call rate | seconds |", "|---|---:|---:|---:|"]
    for name, r in rates.items():
        lines.append(f"| {name} | {r['success']:.1%} | {r.get('tool_call_rate', float('nan')):.1%} | "
                     f"{r['seconds']:.0f} |")
    (RESULTS / "agent_pilot.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
