"""A generated multi-step arithmetic task with exact step labels, for process reward models.

A problem of n steps: a start digit and n operations (+ or - a digit), all mod 10 (or a smaller modulus): "compute mod 10 : 7 + 5 - 3".
A solution writes one step per operation, "7 + 5 = 2", the next starting from the last result. A slip at step j
writes a wrong result there (off by delta); later steps compute correctly from the wrong value, so steps j.. are
all wrong (their running value is) and the final answer is wrong by delta. Everything is drawn from a seeded
random.Random, so a seed gives the same problems and candidates everywhere.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SLIPS = (1, -1, 2, -2)  # how far a slipped result is off (mod 10)
SLIP_WEIGHTS = (0.5, 0.25, 0.125, 0.125)  # a common slip (one too many) and rarer ones


@dataclass(frozen=True)
class Problem:
    start: int
    operations: tuple[tuple[str, int], ...]  # ("+", 5), ("-", 3), ...
    modulus: int = 10

    @property
    def prompt(self) -> str:
        return f"compute mod {self.modulus} : " + " ".join([str(self.start), *(f"{op} {x}" for op, x in self.operations)])

    @property
    def answer(self) -> int:
        return solve(self)[-1][3]


def task_vocabulary() -> list[str]:
    """Every word the task writes (for a word-level tokenizer): digits, operators and the prompt's words."""
    return [*map(str, range(11)), "+", "-", "=", ";", "compute", "mod", ":"]


def make_problem(rng: random.Random, num_steps: int, modulus: int = 10, max_operand: int = 9) -> Problem:
    ops = tuple((rng.choice("+-"), rng.randint(1, max_operand)) for _ in range(num_steps))
    return Problem(rng.randrange(modulus), ops, modulus)


def solve(problem: Problem, slip_step: int | None = None, slip: int = 0) -> list[tuple[int, str, int, int]]:
    """Every step as (value before, op, operand, value after); with slip_step j (0-based) the result of step j is
    off by `slip` and later steps carry the wrong value."""
    steps, value = [], problem.start
    for j, (op, x) in enumerate(problem.operations):
        after = (value + x if op == "+" else value - x) % problem.modulus
        if j == slip_step:
            after = (after + slip) % problem.modulus
        steps.append((value, op, x, after))
        value = after
    return steps


def step_texts(steps: list[tuple[int, str, int, int]]) -> list[str]:
    return [f"{before} {op} {x} = {after}" for before, op, x, after in steps]


@dataclass(frozen=True)
class Candidate:
    steps: list[str]
    labels: list[bool]  # exact: True before the slip, False from it on
    answer: int

    @property
    def correct(self) -> bool:
        return all(self.labels)

    def text(self, separator: str = " ; ") -> str:
        """The solution as one response: every step followed by the separator (data.stepwise.split_steps undoes it)."""
        return "".join(step + separator for step in self.steps)


def candidate(problem: Problem, slip_step: int | None = None, slip: int = 0) -> Candidate:
    steps = solve(problem, slip_step, slip)
    labels = [slip_step is None or j < slip_step for j in range(len(steps))]
    return Candidate(step_texts(steps), labels, steps[-1][3])


def sample_candidate(problem: Problem, rng: random.Random, p_correct: float = 0.4) -> Candidate:
    """A solver's attempt: right with probability p_correct, else one slip at a uniformly drawn step."""
    if rng.random() < p_correct:
        return candidate(problem)
    slip_step = rng.randrange(len(problem.operations))
    return candidate(problem, slip_step, rng.choices(SLIPS, SLIP_WEIGHTS)[0])


def stepwise_records(seed: int, num_problems: int, steps: tuple[int, ...] = (1, 2),
                     slipped_per_problem: int = 2, modulus: int = 10, max_operand: int = 9) -> list[dict]:
    """TRL stepwise rows: per problem (its length drawn from `steps`) the right solution and `slipped_per_problem`
    solutions with one slip each, at a uniformly drawn step."""
    rng = random.Random(seed)
    records = []
    for _ in range(num_problems):
        problem = make_problem(rng, rng.choice(steps), modulus, max_operand)
        attempts = [candidate(problem)]
        for _ in range(slipped_per_problem):
            attempts.append(candidate(problem, rng.randrange(len(problem.operations)), rng.choices(SLIPS, SLIP_WEIGHTS)[0]))
        records += [{"prompt": problem.prompt, "completions": c.steps, "labels": c.labels} for c in attempts]
    return records
