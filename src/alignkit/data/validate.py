"""Checking records against their data shape, through a table from each field to its check: a bad record becomes one
DataError naming source, 1-based row and field, so no later stage re-checks types."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

from alignkit.data.formats import FormatError, split_implicit_prompt
from alignkit.errors import ConfigError, DataError
from alignkit.shapes import SHAPES, fields_of

PROMPT_ROLES = ("system", "user", "assistant", "tool")
RESPONSE_ROLES = ("assistant",)


class _Invalid(Exception):
    """One bad field, before the source and row are attached."""

    def __init__(self, field: str | None, reason: str):
        super().__init__(reason)
        self.field, self.reason = field, reason


def check_shape(shape: str) -> None:
    if shape not in SHAPES:
        raise ConfigError("shape", f"unknown data shape '{shape}'; known: {', '.join(SHAPES)}")


def validate_record(record: Any, shape: str, source: str = "<memory>", row: int | None = None) -> dict:
    """One record checked against `shape`: a new dict with its fields plus `_source` and `_row`."""
    check_shape(shape)
    if not isinstance(record, dict):
        raise DataError(source, row, None, f"record is not a JSON object (got {_kind(record)})")
    required = fields_of(record, shape)
    optional = (*OPTIONAL_FIELDS.get(shape, ()), *ANY_SHAPE_OPTIONAL_FIELDS)
    try:
        if shape == "pairs" and "prompt" not in record and "chosen" in record and "rejected" in record:
            record = _split_implicit_prompt(record)
        for field in required:
            if field not in record:
                raise _Invalid(field, "missing field")
        own_checks = SHAPE_CHECKS.get(shape, {})
        for field, check in CHECKS.items():
            if field in required or field in optional and field in record:
                own_checks.get(field, check)(record, field)
    except _Invalid as bad:
        raise DataError(source, row, bad.field, bad.reason) from None
    return {**record, "_source": source, "_row": row}


def _split_implicit_prompt(record: dict) -> dict:
    """TRL's implicit prompt: two whole conversations sharing their beginning."""
    try:
        prompt, chosen, rejected = split_implicit_prompt(record["chosen"], record["rejected"])
    except FormatError as err:
        raise _Invalid(err.field, err.reason) from None
    return {**record, "prompt": prompt, "chosen": chosen, "rejected": rejected}


# ---------------------------------------------------------------------------------------------- value checks
# Each raises _Invalid naming the field (or the part of it) that is wrong.


def _check_text(value: Any, field: str, roles: tuple[str, ...]) -> None:
    """A non-empty string, or a non-empty list of chat messages {"role": one of roles, "content": str}."""
    if isinstance(value, str):
        _check_string(value, field)
        return
    if not isinstance(value, (list, tuple)):
        raise _Invalid(field, f"expected a non-empty string or a list of chat messages, got {_kind(value)}")
    if not value:
        raise _Invalid(field, "empty list of chat messages")
    for i, message in enumerate(value):
        _check_message(message, f"{field}[{i}]", roles)


def _check_message(message: Any, where: str, roles: tuple[str, ...]) -> None:
    if not isinstance(message, dict):
        raise _Invalid(where, f"chat message must be an object with 'role' and 'content', got {_kind(message)}")
    calls = message.get("tool_calls")  # an assistant turn that calls tools may have no text
    for key in ("role",) if calls else ("role", "content"):
        if key not in message:
            raise _Invalid(f"{where}.{key}", "missing field")
    role = message["role"]
    if not isinstance(role, str) or role not in roles:
        allowed = " or ".join(repr(r) for r in roles)
        got = repr(role) if isinstance(role, str) else _kind(role)
        raise _Invalid(f"{where}.role", f"role must be {allowed} here, got {got}")
    if calls:
        if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
            raise _Invalid(f"{where}.tool_calls", f"expected a list of tool calls (objects), got {_kind(calls)}")
        if message.get("content") not in (None, ""):
            _check_string(message["content"], f"{where}.content")
    else:
        _check_string(message["content"], f"{where}.content")


def _check_chat(messages: Any, field: str) -> None:
    """A list of chat messages that opens with a system or user turn and holds at least one assistant turn."""
    if not isinstance(messages, (list, tuple)):
        raise _Invalid(field, f"expected a list of chat messages, got {_kind(messages)}")
    _check_text(messages, field, PROMPT_ROLES)
    if messages[0]["role"] == "assistant":
        raise _Invalid(f"{field}[0].role", "a chat must open with a 'system' or 'user' turn, got 'assistant'")
    if not any(message["role"] == "assistant" for message in messages):
        raise _Invalid(field, "no 'assistant' turn: there is nothing to train on")


def _check_string(value: Any, field: str) -> None:
    if not isinstance(value, str):
        raise _Invalid(field, f"expected a non-empty string, got {_kind(value)}")
    if not value.strip():
        raise _Invalid(field, "empty string" if not value else "string is only whitespace")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # JSON "\ud800" escapes decode to lone surrogates that tokenizers reject
        raise _Invalid(field, "string holds an unpaired surrogate (not valid Unicode)") from None


def _check_label(value: Any, field: str) -> None:
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return
    raise _Invalid(field, f"expected true/false or 0/1, got {_kind(value)} {_preview(value)}")


def _check_number(value: Any, field: str, not_finite: str = "must be a finite number") -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _Invalid(field, f"expected a number, got {_kind(value)}")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        finite = False
    if not finite:
        raise _Invalid(field, f"{not_finite}, got {_preview(value)}")


def _check_responses(responses: Any, field: str) -> None:
    if not isinstance(responses, (list, tuple)):
        raise _Invalid(field, f"expected a list of responses, got {_kind(responses)}")
    if len(responses) < 2:
        raise _Invalid(field, f"needs at least 2 responses, got {len(responses)}")
    for i, response in enumerate(responses):
        _check_text(response, f"{field}[{i}]", RESPONSE_ROLES)


def _check_samples(samples: Any, field: str, what: str) -> None:
    if not isinstance(samples, (list, tuple)):
        raise _Invalid(field, f"expected a list of {what}, got {_kind(samples)}")
    if not samples:
        raise _Invalid(field, f"needs at least 1 of {what}")
    for i, sample in enumerate(samples):
        _check_text(sample, f"{field}[{i}]", RESPONSE_ROLES)


def _check_steps(record: dict, field: str) -> None:
    """Stepwise records: `completions` a non-empty list of non-empty step strings."""
    steps = record[field]
    if not isinstance(steps, (list, tuple)) or not steps:
        raise _Invalid(field, f"expected a non-empty list of step strings, got {_kind(steps)} {_preview(steps)}")
    for i, step in enumerate(steps):
        _check_string(step, f"{field}[{i}]")


def _check_step_labels(record: dict, field: str) -> None:
    """One true/false label per step of `completions`."""
    labels, steps = record[field], record["completions"]
    if not isinstance(labels, (list, tuple)):
        raise _Invalid(field, f"expected a list of true/false, one per step, got {_kind(labels)}")
    if len(labels) != len(steps):
        raise _Invalid(field, f"{len(labels)} labels for {len(steps)} steps in 'completions'; give one per step")
    for i, label in enumerate(labels):
        if not isinstance(label, bool):
            raise _Invalid(f"{field}[{i}]", f"expected true or false, got {_kind(label)} {_preview(label)}")


def _check_other_rewards(value: Any, field: str) -> None:
    """MODPO: {"chosen": [r_1..r_K], "rejected": [r_1..r_K]}, the other objectives' rewards of each response."""
    if not isinstance(value, dict):
        raise _Invalid(field, f'expected an object {{"chosen": [...], "rejected": [...]}}, got {_kind(value)}')
    for side in ("chosen", "rejected"):
        rewards = value.get(side)
        if not isinstance(rewards, (list, tuple)) or not rewards:
            raise _Invalid(f"{field}.{side}", f"expected a non-empty list of numbers, got {_kind(rewards)}")
        for i, reward in enumerate(rewards):
            _check_number(reward, f"{field}.{side}[{i}]")
    if len(value["chosen"]) != len(value["rejected"]):
        raise _Invalid(field, f"has {len(value['chosen'])} chosen and {len(value['rejected'])} rejected "
                              "rewards; give one per objective for each")


def _check_tools(value: Any, field: str) -> None:
    """TRL's `tools` column: function schemas (JSON objects) handed to the chat template."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(t, dict) for t in value):
        raise _Invalid(field, f"expected a list of tool schemas (JSON objects), got {_kind(value)}")


def _kind(value: Any) -> str:
    """The JSON name of a value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, numbers.Number):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _preview(value: Any, limit: int = 40) -> str:
    try:
        text = repr(value)
    except ValueError:  # an integer past Python's int-to-str digit limit
        return "(too long to show)"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------- the table

Check = Callable[[dict, str], None]  # (record, field): raises _Invalid


def _value_check(check: Callable[..., None], **options) -> Check:
    """A check of one field's value, as a check of the record."""
    return lambda record, field: check(record[field], field, **options)


def _check_scores(record: dict, field: str) -> None:
    scores, responses = record[field], record["responses"]
    if not isinstance(scores, (list, tuple)):
        raise _Invalid(field, f"expected a list of numbers, got {_kind(scores)}")
    for i, score in enumerate(scores):
        _check_number(score, f"{field}[{i}]", "score must be a finite number")
    if len(scores) != len(responses):
        raise _Invalid(field, f"has {len(scores)} scores for {len(responses)} responses; give one per response")
    if len(set(scores)) == 1:
        raise _Invalid(field, f"all {len(scores)} scores tie: the list ranks nothing")


_check_prompt = _value_check(_check_text, roles=PROMPT_ROLES)
_check_response = _value_check(_check_text, roles=RESPONSE_ROLES)


def _check_distinct_rejected(record: dict, field: str) -> None:
    _check_response(record, field)
    if record["chosen"] == record[field]:
        raise _Invalid(field, "identical to chosen: the pair carries no training signal")


# Every checked field and its check, in the order they run (a record with several faults reports the first). A
# shape's required fields (alignkit.shapes) are always checked, its optional fields when present; others are kept.
CHECKS: dict[str, Check] = {
    "prompt": _check_prompt,
    "chosen": _check_response,
    "rejected": _check_response,
    "completion": _check_response,
    "messages": _value_check(_check_chat),
    "text": _value_check(_check_string),
    "label": _value_check(_check_label),
    "responses": _value_check(_check_responses),
    "scores": _check_scores,
    "margin": _value_check(_check_number),
    "score_chosen": _value_check(_check_number),
    "score_rejected": _value_check(_check_number),
    "tools": _value_check(_check_tools),
    "short_prompt": _check_prompt,  # LongPO: the same question with the short context
    "harmful_completion": _value_check(_check_string),  # deep safety alignment: the answer a refusal declines
    "other_rewards": _value_check(_check_other_rewards),
    "samples": _value_check(_check_samples, what="the model's own responses"),
    "rejections": _value_check(_check_samples, what="dis-preferred responses"),
    "completions": _check_steps,  # stepwise: the steps, then one label per step
    "labels": _check_step_labels,
}
# A shape's own check of a field, in the field's place in CHECKS.
SHAPE_CHECKS: dict[str, dict[str, Check]] = {"pairs": {"rejected": _check_distinct_rejected}}
OPTIONAL_FIELDS = {"pairs": ("margin", "score_chosen", "score_rejected", "other_rewards"),
                   "sft": ("harmful_completion",), "prompts": ("harmful_completion",)}
ANY_SHAPE_OPTIONAL_FIELDS = ("tools", "short_prompt")


# ---------------------------------------------------------------------------------------------- across records

# List fields whose length must be the same in every record of a data set (a batch packs a fixed number of
# responses per example; a loss weights a fixed number of objectives).
SAME_COUNT_FIELDS = {"negatives": ("samples",), "rejections": ("rejections",), "pairs": ("other_rewards",)}


def check_same_counts(record: dict, shape: str, counts: dict[str, tuple[int | None, int | None]], source: str,
                      row: int | None) -> None:
    """A list field that one record has, every record has, with as many entries (None: the field is absent)."""
    for field in SAME_COUNT_FIELDS.get(shape, ()):
        value = record.get(field)
        n = None if value is None else len(value["chosen"]) if isinstance(value, dict) else len(value)
        first, first_row = counts.setdefault(field, (n, row))
        if n != first:
            have = "is missing" if n is None else f"has {n} entries"
            other = "has it" if n is None else "has none" if first is None else f"has {first}"
            raise DataError(source, row, field, f"{have} but row {first_row} {other}; every record needs the same "
                            "number")
