"""Rewards a program can check (RLVR): instruction-following constraints (IFEval / Tulu 3 style) and math final
answers. Each reads a per-prompt field of the prompt records (`constraints`, `answer`) bound with `bind`."""

from alignkit.rewards.verifiable.constraints import (
           CHECKERS,
           ConstraintReward,
           check_all,
           validate_constraints,
)
from alignkit.rewards.verifiable.math import ExactMatch, MathAnswer, extract_answer, same_answer

__all__ = ["CHECKERS", "ConstraintReward", "ExactMatch", "MathAnswer", "check_all", "extract_answer", "same_answer",
           "validate_constraints"]
