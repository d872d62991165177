"""Tool use on generated arithmetic word problems: the model may call `calculate(expression)` (run in the sandbox)
as often as its turns allow; the turn without a call is its answer, and the reward is 1 when that answer's final
number is exactly the problem's (rewards/verifiable/math.py reads it), else 0.

Problems have two steps (a product, then a sum or difference, over two- and three-digit numbers) or one (the product
alone): easy to state, hard to do in one's head for a small model, one calculate call away from right. `make agent`
uses the one-step problems: after a warm start on worked calls a 135M model learns to hand them to the tool on 2
cores (docs/agent_pilot.md)."""

from __future__ import annotations

import json
import random
import re

from alignkit.envs.adapters import prompt_messages
from alignkit.envs.base import DEFAULT_LIMITS, Limits, Step
from alignkit.envs.sandbox import calculate
from alignkit.envs.tools import run_tool_calls, tool_schema
from alignkit.rewards.verifiable.math import extract_answer, same_answer

# The call is shown in full: SmolLM2-135M rarely writes a well-formed call from the schema alone (the pilot:
# docs/agent_pilot.md).
INSTRUCTION = (' Use the calculate tool for the arithmetic, like this: <tool_call>{"name": "calculate", "arguments": '
               '{"expression": "12 * 34"}}</tool_call> Then give the final answer as a number.')
NAMES = ("Ana", "Ben", "Chloe", "David", "Emma", "Farid", "Grace", "Hugo", "Iris", "Jonas", "Kemal", "Lena")
# (question, answer) templates over a, b: two-digit, c: three-digit numbers.
PROBLEMS = (
    ("A shop has {a} boxes with {b} pencils in each box. It sells {c} pencils. How many pencils are left?",
     lambda a, b, c: a * b - c),
    ("{name} saves {a} dollars a week for {b} weeks, then spends {c} dollars. How many dollars are left?",
     lambda a, b, c: a * b - c),
    ("A train has {b} cars with {a} passengers in each. At the station {c} more people get on. How many passengers "
     "are on the train?", lambda a, b, c: a * b + c),
    ("A farm fills {a} crates with {b} apples each and already has {c} apples in the barn. How many apples does it "
     "have?", lambda a, b, c: a * b + c),
    ("{name} reads {a} pages a day for {b} days. The book has {c} more pages than that. How many pages does the book "
     "have?", lambda a, b, c: a * b + c),
    ("A hall has {a} rows of {b} seats. {c} seats are taken. How many seats are free?", lambda a, b, c: a * b - c),
    ("A baker makes {a} trays of {b} rolls and gives away {c} rolls. How many rolls are left?",
     lambda a, b, c: a * b - c),
    ("{name} buys {a} stamps at {b} cents each and has {c} cents left. How many cents did {name} have at first?",
     lambda a, b, c: a * b + c),
)


# One-step problems: (question, answer) over two-digit a, b.
ONE_STEP = (
    ("A shop has {a} boxes with {b} pencils in each box. How many pencils does it have?", lambda a, b, c: a * b),
    ("{name} saves {a} dollars a week for {b} weeks. How many dollars does {name} save?", lambda a, b, c: a * b),
    ("A train has {b} cars with {a} passengers in each. How many passengers are on the train?",
     lambda a, b, c: a * b),
    ("A farm fills {a} crates with {b} apples each. How many apples are in the crates?", lambda a, b, c: a * b),
    ("{name} reads {a} pages a day for {b} days. How many pages does {name} read?", lambda a, b, c: a * b),
    ("A hall has {a} rows of {b} seats. How many seats does it have?", lambda a, b, c: a * b),
    ("A baker makes {a} trays of {b} rolls. How many rolls does the baker make?", lambda a, b, c: a * b),
    ("{name} buys {a} stamps at {b} cents each. How many cents does {name} pay?", lambda a, b, c: a * b),
)
TEMPLATES = {1: ONE_STEP, 2: PROBLEMS}


def make_problem(rng: random.Random, template: int, steps: int = 2) -> dict:
    question, answer = TEMPLATES[steps][template]
    a, b = rng.randint(12, 99), rng.randint(12, 99)
    c = rng.randint(100, min(999, a * b - 1))  # three digits, and every answer positive
    text = question.format(a=a, b=b, c=c, name=rng.choice(NAMES))
    return {"prompt": [{"role": "user", "content": text + INSTRUCTION}], "answer": str(answer(a, b, c))}


def arithmetic_sets(n_train: int, n_eval: int, seed: int = 0, steps: int = 2) -> tuple[list[dict], list[dict]]:
    """(training, held-out) problems of `steps` steps (1 or 2), each set cycling through the templates; the held-out
    numbers are drawn from their own seeded stream and no held-out question appears in training."""
    if steps not in TEMPLATES:
        raise ValueError(f"steps must be 1 or 2, got {steps!r}")
    templates = TEMPLATES[steps]
    train_rng, eval_rng = random.Random(seed), random.Random(seed + 1_000_003)
    train = [make_problem(train_rng, i % len(templates), steps) for i in range(n_train)]
    seen = {r["prompt"][0]["content"] for r in train}
    held: list[dict] = []
    while len(held) < n_eval:
        record = make_problem(eval_rng, len(held) % len(templates), steps)
        if record["prompt"][0]["content"] not in seen:
            held.append(record)
    return train, held


def demonstration_problems(n: int, exclude: list[dict], seed: int = 0, steps: int = 2) -> list[dict]:
    """n problems for worked demonstrations (a warm start), from their own seeded stream, none of whose questions
    is among `exclude` (the training and held-out problems); cycling through the templates like the other sets."""
    rng, taken = random.Random(seed + 2_000_029), {r["prompt"][-1]["content"] for r in exclude}
    out: list[dict] = []
    while len(out) < n:
        record = make_problem(rng, len(out) % len(TEMPLATES[steps]), steps)
        if record["prompt"][-1]["content"] not in taken:
            taken.add(record["prompt"][-1]["content"])
            out.append(record)
    return out


def worked_replies(record: dict) -> list[str]:
    """The assistant turns of a worked solution: one calculate call with the problem's expression, in the format
    the instruction shows, then the answer."""
    question = record["prompt"][-1]["content"].removesuffix(INSTRUCTION)
    numbers = [int(x) for x in re.findall(r"\d+", question)]
    answer = int(record["answer"])
    expression = f"{numbers[0]} * {numbers[1]}"
    if len(numbers) > 2:
        expression += f" {'-' if numbers[0] * numbers[1] - numbers[2] == answer else '+'} {numbers[2]}"
    call = json.dumps({"name": "calculate", "arguments": {"expression": expression}})
    return [f"<tool_call>{call}</tool_call>", f"The answer is {answer}."]


class ArithmeticTools:
    """One problem per rollout; rows: {"prompt", "answer"}."""

    name = "arithmetic_tools"

    def __init__(self, limits: Limits = DEFAULT_LIMITS):
        self.functions = {"calculate": calculate}
        self.tools = [tool_schema(calculate, self.name)]
        self.timeout, self.max_chars = limits.tool_timeout, limits.tool_output_chars
        self.answer, self.calls = "", 0

    def reset(self, row: dict) -> list[dict]:
        self.answer, self.calls = str(row["answer"]), 0
        return prompt_messages(row)

    def step(self, message: dict) -> Step:
        if message.get("tool_calls") or message.get("tool_call_errors"):
            self.calls += len(message.get("tool_calls") or [])
            return Step(run_tool_calls(message, self.functions, self.timeout, self.max_chars), None, False, {})
        correct = same_answer(extract_answer(message["content"]), self.answer)
        return Step([], float(correct), True, {"correct": correct, "calculate_calls": self.calls})

    def final_reward(self) -> float:
        return 0.0  # out of turns before answering

    def close(self) -> None:
        pass


def arithmetic_report(trajectories) -> dict[str, float]:
    """Accuracy (a final answer equal to the problem's) and tool-call rate (share of trajectories that called
    calculate at least once)."""
    n = max(len(trajectories), 1)
    return {"accuracy": sum(t.reward == 1.0 for t in trajectories) / n,
            "tool_call_rate": sum(t.tool_calls > 0 for t in trajectories) / n,
            "tool_errors_per_trajectory": sum(t.tool_errors for t in trajectories) / n}
