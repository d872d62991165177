"""The environment of bench_agent.py, written as a TRL 1.16 user writes one for GRPOTrainer(environment_factory=...):
reset(**row) sees the row's fields and returns None (the prompt stays as it is), every other public method is a tool
described by its signature and Google-style docstring. alignkit runs this very class through
`environment: calculator_env:CalculatorEnv`.

The tool is alignkit's sandboxed `calculate` (exact arithmetic in a subprocess). The reward, exact final answer, is
given to both tools as a reward function (TRL's environment cannot see the model's last answer): the record's
`answer` against the answer the last assistant turn commits to, by alignkit's math checker."""

from __future__ import annotations

import time

from alignkit.envs.sandbox import calculate as sandboxed_calculate
from alignkit.rewards.verifiable.math import MathAnswer


class CalculatorEnv:
    def reset(self, **row) -> None:
        self.calls = 0
        return None

    def calculate(self, expression: str) -> str:
        """Evaluate an arithmetic expression exactly.

        Args:
            expression: The expression, e.g. "37 * 24 - 150". Numbers, + - * / // % ** and parentheses only.
        """
        self.calls += 1
        return sandboxed_calculate(expression)


CHECKER = MathAnswer()


def exact_answer(completions, answer, **kwargs) -> list[float]:
    """TRL's reward function: 1.0 where the last assistant turn's final number equals the row's answer, else 0.0."""
    scores = []
    for completion, reference in zip(completions, answer):
        last = next((m.get("content") or "" for m in reversed(completion) if m["role"] == "assistant"), "")
        scores.append(CHECKER.score_one(str(reference), last))
    return scores


class SlowCalculatorEnv(CalculatorEnv):
    """CalculatorEnv whose tool call first waits tool_seconds, as a call to a remote service would (bench_async.py's
    I/O-bound setting; the wait is a sleep, so concurrent calls overlap)."""

    tool_seconds = 0.2

    def calculate(self, expression: str) -> str:
        """Evaluate an arithmetic expression exactly.

        Args:
            expression: The expression, e.g. "37 * 24 - 150". Numbers, + - * / // % ** and parentheses only.
        """
        time.sleep(self.tool_seconds)
        return super().calculate(expression)
