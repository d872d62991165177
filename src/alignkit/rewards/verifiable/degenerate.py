"""Per-answer flags for answers that meet a checker's letter, not its instruction (reward hacking in RLVR), each a
pure function with its thresholds below and in its docstring:

- repetition: over 25% of the word 3-grams repeat, or one word is over 30% of the words, 5 times or more.
- copied_example: the instruction's example copied (`<<title>>`, `[name]` twice or more, `[placeholder]`), or an
  answer of nothing but the instruction's quoted words ("window").
- empty_items: a list item with no words (`* ***`, a bare `*`) or an unpaired `*` (`* *pure* bees ...*`).
- keyword_stuffing: a required word 4 times or more and over 6% of the words. A topical noun in fluent prose is
  well under 1% of its words, and a short answer asked to include it uses it once or twice; where the task itself
  names the word ("Tell me about rivers"), both bounds double.
- restates_prompt: over half of the answer's word 3-grams occur in the prompt.

Words, bullets, placeholders and titles are found as the checkers find them. DegenerateGuard sets the reward of a
flagged answer; flag_shares summarises a set of answers for a report."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

from alignkit.errors import DataError
from alignkit.rewards.base import Reward
from alignkit.rewards.transforms import prompt_key
from alignkit.rewards.verifiable.constraints import (
    _BULLET,
    _PLACEHOLDER,
    _TITLE,
    CHECKERS,
    validate_constraints,
    words,
)
from alignkit.rewards.verifiable.records import bind_records

REPEAT_SHARE, TOP_WORD_SHARE, TOP_WORD_MIN = 0.25, 0.3, 5
COPIES_MIN = 2
STUFF_MIN, STUFF_SHARE, TOPIC_FACTOR = 4, 0.06, 2
RESTATE_SHARE = 0.5
FLAGS = ("repetition", "copied_example", "empty_items", "keyword_stuffing", "restates_prompt")

_QUOTED = re.compile(r'"([^"\n]+)"')
_EXAMPLES = CHECKERS["placeholders"].describe(n=1) + " " + CHECKERS["title"].describe()


def prompt_text(prompt) -> str:
    """A prompt as text: the string, or the user messages of a chat prompt joined."""
    if prompt is None or isinstance(prompt, str):
        return prompt or ""
    return "\n".join(m.get("content", "") for m in prompt if m.get("role", "user") == "user")


def _lower_words(text: str) -> list[str]:
    return [w.lower() for w in words(text)]


def _trigrams(text: str) -> list[tuple[str, ...]]:
    tokens = _lower_words(text)
    return list(zip(tokens, tokens[1:], tokens[2:]))


def repetition(answer: str) -> bool:
    """Over REPEAT_SHARE of the word 3-grams repeat an earlier one, or one word is over TOP_WORD_SHARE of the
    words and occurs TOP_WORD_MIN times or more."""
    grams = _trigrams(answer)
    if grams and 1 - len(set(grams)) / len(grams) > REPEAT_SHARE:
        return True
    tokens = _lower_words(answer)
    top = Counter(tokens).most_common(1)
    return bool(top) and top[0][1] >= TOP_WORD_MIN and top[0][1] / len(tokens) > TOP_WORD_SHARE


def _key(text: str) -> str:
    return " ".join(_lower_words(text))


def _phrases(constraints, prompt: str) -> list[str]:
    """The instruction's quoted words and phrases: from the prompt, and from the constraints' arguments."""
    found = _QUOTED.findall(prompt)
    for spec in constraints or []:
        found += spec.get("words", []) + ([spec["phrase"]] if "phrase" in spec else [])
    return [p for p in found if words(p)]


def copied_example(answer: str, constraints=None, prompt=None) -> bool:
    """A title that is an example title or has no words; a placeholder with no words or reading "placeholder";
    an example placeholder COPIES_MIN times or more (once it is a fair slot, "Dear [name]"); or nothing but the
    instruction's quoted words. Examples: the checkers' own instructions and the prompt's."""
    text = prompt_text(prompt)
    examples = _EXAMPLES + " " + text
    titles = [_key(t) for t in _TITLE.findall(answer)]
    if any(t == "" or t in {_key(e) for e in _TITLE.findall(examples)} for t in titles):
        return True
    slots = [_key(p) for p in _PLACEHOLDER.findall(answer)]
    if any(s in ("", "placeholder", "placeholders") for s in slots):
        return True
    copies = {_key(p) for p in _PLACEHOLDER.findall(examples)}
    if sum(s in copies for s in slots) >= COPIES_MIN:
        return True
    allowed = {w for p in _phrases(constraints, text) for w in _lower_words(p)}
    said = set(_lower_words(answer))
    return bool(said) and bool(allowed) and said <= allowed


def empty_items(answer: str) -> bool:
    """A bare `*` or `-` line, or a bullet (as the bullets checker counts them) whose item has no words or an
    unpaired `*`."""
    for line in answer.splitlines():
        stripped = line.strip()
        if stripped in ("*", "-"):
            return True
        if _BULLET.match(line):
            item = stripped[1:]
            if not words(item) or item.count("*") % 2:
                return True
    return False


def keyword_stuffing(answer: str, constraints=None, prompt=None) -> bool:
    """A word of an `include` constraint at least STUFF_MIN times and over STUFF_SHARE of the words (both
    TOPIC_FACTOR times higher where the prompt, outside its quotes, has a word starting with it: its topic)."""
    tokens = _lower_words(answer)
    task = _lower_words(_QUOTED.sub(" ", prompt_text(prompt)))
    for spec in constraints or []:
        if spec["type"] != "include":
            continue
        for word in spec["words"]:
            key = _lower_words(word)
            if not key:
                continue
            n = sum(tokens[i:i + len(key)] == key for i in range(len(tokens)))
            factor = TOPIC_FACTOR if any(t.startswith(key[0]) for t in task) else 1
            if n >= STUFF_MIN * factor and n / len(tokens) > STUFF_SHARE * factor:
                return True
    return False


def restates_prompt(answer: str, prompt=None) -> bool:
    """Over RESTATE_SHARE of the answer's word 3-grams (at least 2 of them) occur in the prompt."""
    grams, source = _trigrams(answer), set(_trigrams(prompt_text(prompt)))
    return len(grams) >= 2 and sum(g in source for g in grams) / len(grams) > RESTATE_SHARE


def flags(answer: str, constraints=None, prompt=None) -> dict[str, bool]:
    """Every flag of one answer; constraints: its record's validated `constraints` (or None)."""
    return {"repetition": repetition(answer), "copied_example": copied_example(answer, constraints, prompt),
            "empty_items": empty_items(answer), "keyword_stuffing": keyword_stuffing(answer, constraints, prompt),
            "restates_prompt": restates_prompt(answer, prompt)}


def flagged(answer: str, constraints=None, prompt=None) -> list[str]:
    """The names of the flags one answer trips, in FLAGS order."""
    return [name for name, hit in flags(answer, constraints, prompt).items() if hit]


def flag_shares(items: Iterable[tuple[str, list | None, object]]) -> dict[str, float]:
    """Share of (answer, constraints, prompt) items that trip each flag, and "any": the share that trips one."""
    counts, n = Counter(), 0
    for answer, constraints, prompt in items:
        hits = flagged(answer, constraints, prompt)
        counts.update(hits)
        counts["any"] += bool(hits)
        n += 1
    return {name: counts[name] / n if n else 0.0 for name in (*FLAGS, "any")}


class DegenerateGuard(Reward):
    """The wrapped reward, except that an answer tripping any of `only` (default: every flag) scores `value`
    (default 0.0: the floor ConstraintReward gives its too-short and repetitive answers, below any answer that
    meets a constraint). bind(records) reads each record's `constraints` where it has one (validated) and binds
    the wrapped reward; prompts without constraints are judged on the prompt text alone."""

    def __init__(self, reward: Reward, value: float = 0.0, only: tuple[str, ...] = FLAGS,
                 name: str = "degenerate_guard"):
        unknown = [f for f in only if f not in FLAGS]
        if unknown:
            raise ValueError(f"unknown flags {unknown}; known: {', '.join(FLAGS)}")
        self.reward, self.value, self.only, self.name = reward, float(value), tuple(only), name
        self.table: dict[str, list[dict]] = {}

    def bind(self, records: Iterable[dict]) -> DegenerateGuard:
        records = list(records)
        bind_records(self.reward, records)  # the wrapped reward names a bad field first, as it does unguarded
        for record in records:
            if "constraints" in record:
                try:
                    self.table[prompt_key(record["prompt"])] = validate_constraints(record["constraints"])
                except ValueError as err:
                    raise DataError(record.get("_source", "<memory>"), record.get("_row"), "constraints",
                                    str(err)) from None
        return self

    def score(self, prompts, responses):
        scores = self.reward(prompts, responses)
        out = []
        for prompt, response, score in zip(prompts, responses, scores):
            hits = flags(response, self.table.get(prompt_key(prompt)), prompt)
            out.append(self.value if any(hits[f] for f in self.only) else score)
        return out
