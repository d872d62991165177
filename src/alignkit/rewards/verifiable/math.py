"""Math final answers: extract the answer a response commits to and compare it with the reference, numerically where
both parse as numbers (integers, decimals, fractions, LaTeX \\frac, thousands separators), else as normalised text.

The answer is, in order of preference: the last \\boxed{...}; the number after "the answer is" / "answer:" / "####";
the last number in the text."""

from __future__ import annotations

import math
import re
from fractions import Fraction

from alignkit.rewards.verifiable.records import RecordReward

_NUMBER = r"-?\$?\s*(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?|-?\.\d+"
_NUMBER_RE = re.compile(_NUMBER)
_ANSWER_IS = re.compile(r"(?:the (?:final )?answer is|answer\s*:|####)\s*:?\s*(.+)", re.IGNORECASE)
_FRAC = re.compile(r"\\d?frac\{([^{}]+)\}\{([^{}]+)\}")


def _boxed(text: str) -> str | None:
    """The contents of the last \\boxed{...}, braces balanced."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def extract_answer(text: str) -> str | None:
    boxed = _boxed(text)
    if boxed is not None:
        return boxed.strip()
    stated = _ANSWER_IS.findall(text)
    if stated:
        first = _NUMBER_RE.search(_FRAC.sub(r"\1/\2", stated[-1]))
        return first.group(0).strip() if first else stated[-1].strip().rstrip(".")
    numbers = _NUMBER_RE.findall(_FRAC.sub(r"\1/\2", text))
    return numbers[-1].strip() if numbers else None


def parse_number(text: str) -> Fraction | None:
    """'1,234' '-3.5' '3/4' '\\frac{3}{4}' '$12' '50%' -> an exact Fraction; None if it is not one number."""
    s = _FRAC.sub(r"(\1)/(\2)", text.strip()).replace("$", "").replace(" ", "").rstrip(".")
    s = s.replace("(", "").replace(")", "").replace("\\!", "").replace("{,}", "")
    percent = s.endswith("%") or s.endswith("\\%")
    s = s.rstrip("%").rstrip("\\")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    try:
        if "/" in s:
            num, den = s.split("/")
            value = Fraction(Fraction(num), Fraction(den))
        else:
            value = Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
    return value / 100 if percent else value


def _normalise(text: str) -> str:
    return re.sub(r"\s+|\\text\{|\}|\\,|\.$", "", text.lower())


def same_answer(predicted: str | None, reference: str, rel_tol: float = 1e-6) -> bool:
    """Equal as numbers (relative tolerance rel_tol; 0.5 == 1/2 == \\frac{1}{2}), or as normalised text."""
    if predicted is None:
        return False
    a, b = parse_number(predicted), parse_number(str(reference))
    if a is not None and b is not None:
        return math.isclose(float(a), float(b), rel_tol=rel_tol, abs_tol=rel_tol if b == 0 else 0.0)
    return _normalise(predicted) == _normalise(str(reference))


class MathAnswer(RecordReward):
    """1 if the response's final answer equals the record's `answer`, else 0 (DAPO's ±1: correct=1, wrong=-1)."""

    field = "answer"

    def __init__(self, correct: float = 1.0, wrong: float = 0.0, rel_tol: float = 1e-6, name: str = "math",
                 field: str = "answer"):
        super().__init__()
        self.correct, self.wrong, self.rel_tol, self.name, self.field = correct, wrong, rel_tol, name, field

    def parse(self, value):
        if isinstance(value, bool) or not isinstance(value, (str, int, float)) or str(value).strip() == "":
            raise ValueError(f"expected a non-empty string or number, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"expected a finite number, got {value!r}")
        return str(value).strip()

    def score_one(self, answer, response: str) -> float:
        return self.correct if same_answer(extract_answer(response), answer, self.rel_tol) else self.wrong


class ExactMatch(RecordReward):
    """1 if the response, stripped (and case-folded unless case_sensitive), equals the record's `answer`."""

    field = "answer"

    def __init__(self, case_sensitive: bool = False, name: str = "exact_match"):
        super().__init__()
        self.case_sensitive, self.name = case_sensitive, name

    def parse(self, value):
        if not isinstance(value, (str, int)) or isinstance(value, bool) or str(value).strip() == "":
            raise ValueError(f"expected a non-empty string, got {value!r}")
        return str(value).strip()

    def score_one(self, answer, response: str) -> float:
        a, b = response.strip(), answer
        return float(a == b if self.case_sensitive else a.casefold() == b.casefold())
