"""Self-correction over two attempts (SCoRe, Kumar et al., arXiv 2409.12917) on the constraint prompts of
rewards/verifiable: attempt 1; the checkers' verdict as a user turn naming each instruction it breaks; attempt 2.

Compliance r is the fraction of the prompt's constraints an attempt meets. Turn rewards: r1 after attempt 1, and
r2 + alpha * (r2 - r1) after attempt 2 (SCoRe's progress bonus). With `reward: final` a trajectory scores
r2 + alpha * (r2 - r1); with `reward: sum`, r1 + r2 + alpha * (r2 - r1), SCoRe's stage-II objective."""

from __future__ import annotations

from alignkit.envs.adapters import prompt_messages
from alignkit.envs.base import Step
from alignkit.rewards.verifiable.constraints import check_all, describe, validate_constraints
from alignkit.rewards.verifiable.prompts import prompt_sets

# Types a checker verdict can be stated for plainly, and that a small model can fix in one rewrite.
TYPES = ("no_commas", "lowercase", "max_words", "include", "exclude", "starts_with", "ends_with", "max_sentences",
         "quoted", "title")
ALL_MET = "Your answer follows every instruction. Write your final answer."


def feedback(constraints: list[dict], met: list[bool]) -> str:
    """The user turn after attempt 1: the instructions the answer breaks, as the prompt stated them."""
    broken = [describe(spec) for spec, ok in zip(constraints, met) if not ok]
    if not broken:
        return ALL_MET
    return ("Your answer does not follow these instructions: " + " ".join(broken)
            + " Write your answer again so that it follows every instruction.")


class SelfCorrection:
    """Two attempts at a constraint prompt; one instance per rollout. Rows: {"prompt", "constraints"}."""

    name = "self_correction"
    tools: list = []

    def __init__(self, alpha: float = 1.0):
        self.alpha = alpha
        self.constraints: list[dict] = []
        self.first: float | None = None

    def reset(self, row: dict) -> list[dict]:
        self.constraints, self.first = validate_constraints(row["constraints"]), None
        return prompt_messages(row)

    def step(self, message: dict) -> Step:
        met = check_all(self.constraints, message.get("text", message["content"]).strip())
        score = sum(met) / len(met)
        if self.first is None:
            self.first, self.first_all = score, all(met)
            reply = {"role": "user", "content": feedback(self.constraints, met)}
            return Step([reply], score, False, {"attempt": 1, "compliance": score, "all_met": all(met)})
        info = {"attempt": 2, "first_compliance": self.first, "second_compliance": score,
                "first_all_met": self.first_all, "second_all_met": all(met)}
        return Step([], score + self.alpha * (score - self.first), True, info)

    def close(self) -> None:
        pass


def self_correction_sets(n_train: int, n_eval: int, seed: int = 0, types: tuple[str, ...] = TYPES
                         ) -> tuple[list[dict], list[dict]]:
    """(training, held-out) constraint records: the held-out set shares no topic and no combination of constraint
    types with the training set (rewards/verifiable/prompts.py)."""
    return prompt_sets(types, n_train, n_eval, seed)


def self_correction_report(trajectories) -> dict[str, float]:
    """First- and second-attempt compliance (mean fraction met, share with all met) and SCoRe's transition shares:
    wrong -> right and right -> wrong between the attempts (all constraints met = right)."""
    finished = [t.infos[-1] for t in trajectories if t.infos and t.infos[-1].get("attempt") == 2]
    n = max(len(finished), 1)
    return {
        "first_compliance": sum(i["first_compliance"] for i in finished) / n,
        "second_compliance": sum(i["second_compliance"] for i in finished) / n,
        "first_all_met": sum(i["first_all_met"] for i in finished) / n,
        "second_all_met": sum(i["second_all_met"] for i in finished) / n,
        "wrong_to_right": sum(not i["first_all_met"] and i["second_all_met"] for i in finished) / n,
        "right_to_wrong": sum(i["first_all_met"] and not i["second_all_met"] for i in finished) / n,
        "finished": len(finished) / max(len(trajectories), 1),
    }
