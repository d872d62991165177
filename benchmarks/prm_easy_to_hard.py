"""Easy-to-hard reranking with a process reward model (Sun et al., arXiv 2403.09472; Lightman et al. 2305.20050).

A tiny Llama PRM and an outcome RM (the same rows, only the last step labelled: train_on_last_step_only) are trained
in-process on 1-2-step problems of the generated arithmetic task (data/step_arithmetic.py); then, on held-out 4-5-step
problems, n candidates per problem drawn by the task's own solver (right with probability p_correct, else one slip)
are reranked. Reports best-of-n accuracy (the picked candidate's final answer is right) at n = 4 and 16 for: one
sample, majority vote, best-of-n with the outcome RM, best-of-n and weighted best-of-n with the PRM (min), and
pass@n (some candidate is right), plus each model's pairwise ranking of a right vs a slipped solution.

    nice -n 19 python benchmarks/prm_easy_to_hard.py [--problems 500] [--epochs 30] [--train_steps 1 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from alignkit.data.step_arithmetic import (
    SLIP_WEIGHTS,
    SLIPS,
    candidate,
    make_problem,
    sample_candidate,
    stepwise_records,
    task_vocabulary,
)
from alignkit.decode.bon import argmax_first, weighted_pick
from alignkit.models.tiny import build_tiny_prm, build_word_tokenizer
from alignkit.rewards.prm import ProcessRewardScorer
from alignkit.train.prm import PRMConfig, train_prm

SEP = " ; "


def train(args, tokenizer, outcome_only: bool):
    model = build_tiny_prm("llama", len(tokenizer), seed=args.seed, hidden=args.hidden, layers=2)
    rows = stepwise_records(args.seed, args.problems, tuple(args.train_steps), 2, 10, args.max_operand)
    cfg = PRMConfig(model="tiny", train_data=rows, output_dir=str(Path(args.out) / ("orm" if outcome_only else "prm")),
                    step_separator=SEP, train_on_last_step_only=outcome_only, epochs=args.epochs,
                    batch_size=args.batch_size, learning_rate=args.lr, seed=args.seed)
    return train_prm(cfg, model, tokenizer).model


def majority(answers: list[int]) -> int:
    counts = Counter(answers)
    return max(range(len(answers)), key=lambda i: (counts[answers[i]], -i))


def evaluate(args, tokenizer, prm, orm) -> dict:
    rng = random.Random(args.seed + 1000)
    problems = [make_problem(rng, rng.choice((4, 5)), 10, args.max_operand) for _ in range(args.eval_problems)]
    pools = [[sample_candidate(p, rng, args.p_correct) for _ in range(max(args.n))] for p in problems]
    scorers = {name: ProcessRewardScorer.from_model(model, tokenizer, SEP, how)
               for name, model, how in (("prm", prm, "min"), ("orm", orm, "last"))}
    scores = {}
    for name, scorer in scorers.items():
        flat = scorer([p.prompt for p, pool in zip(problems, pools) for _ in pool],
                      [c.text(SEP) for pool in pools for c in pool])
        scores[name] = np.asarray(flat).reshape(len(problems), -1)
    table = {}
    for n in args.n:
        picks = {"one sample": lambda i, pool: 0, "majority vote": lambda i, pool: majority([c.answer for c in pool]),
                 "best-of-n, outcome RM (last)": lambda i, pool, n=n: argmax_first(list(scores["orm"][i, :n])),
                 "best-of-n, PRM (min)": lambda i, pool, n=n: argmax_first(list(scores["prm"][i, :n])),
                 "weighted best-of-n, PRM (min)": lambda i, pool, n=n: weighted_pick(list(scores["prm"][i, :n]),
                                                                               [c.answer for c in pool]),
                 "pass@n (some candidate right)": lambda i, pool: next((j for j, c in enumerate(pool) if c.correct), 0)}
        table[n] = {name: float(np.mean([pools[i][:n][pick(i, pools[i][:n])].correct for i in range(len(problems))]))
                    for name, pick in picks.items()}
    return table


def pair_ranking(args, tokenizer, model, how: str, steps: tuple[int, ...] = (4, 5)) -> float:
    """Share of (right, slipped) solutions of held-out problems the model scores right higher (ties half)."""
    rng = random.Random(args.seed + 2000)
    scorer = ProcessRewardScorer.from_model(model, tokenizer, SEP, how)
    wins = []
    for _ in range(args.eval_problems):
        problem = make_problem(rng, rng.choice(steps), 10, args.max_operand)
        right = candidate(problem)
        wrong = candidate(problem, rng.randrange(len(problem.operations)), rng.choices(SLIPS, SLIP_WEIGHTS)[0])
        a, b = scorer([problem.prompt] * 2, [right.text(SEP), wrong.text(SEP)])
        wins.append(1.0 if a > b else 0.5 if a == b else 0.0)
    return float(np.mean(wins))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=500, help="training problems (1-2 steps; 3 rows each)")
    parser.add_argument("--eval_problems", type=int, default=300, help="held-out problems (4-5 steps)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--max_operand", type=int, default=1, help="operations are +k or -k with 1 <= k <= this")
    parser.add_argument("--p_correct", type=float, default=0.4, help="the candidate sampler's share of right ones")
    parser.add_argument("--n", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--train_steps", type=int, nargs="+", default=[1, 2], help="steps of the training problems")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/prm_easy_to_hard")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.time()
    tokenizer = build_word_tokenizer(task_vocabulary())
    prm, orm = train(args, tokenizer, outcome_only=False), train(args, tokenizer, outcome_only=True)
    trained = time.time() - start
    table = evaluate(args, tokenizer, prm, orm)
    ranking = {f"{name}, {lo}-{hi} steps": pair_ranking(args, tokenizer, model, how, (lo, hi))
               for lo, hi in ((2, 2), (3, 3), (4, 5)) for name, model, how in (("prm", prm, "min"), ("orm", orm, "last"))}
    summary = {"args": vars(args), "accuracy": table, "pair_ranking": ranking, "train_seconds": round(trained, 1),
               "total_seconds": round(time.time() - start, 1)}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"| method | {' | '.join(f'n = {n}' for n in args.n)} |\n|---|{'---:|' * len(args.n)}")
    for name in table[args.n[0]]:
        print(f"| {name} | {' | '.join(f'{100 * table[n][name]:.1f}%' for n in args.n)} |")
    print("right-vs-slipped ranking of held-out problems: "
          + ", ".join(f"{name} {100 * value:.1f}%" for name, value in ranking.items()))
    print(f"{summary['total_seconds']:.0f} s, training {trained:.0f} s")


if __name__ == "__main__":
    main()
