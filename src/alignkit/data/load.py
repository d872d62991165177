"""Read records (JSONL, JSON, Parquet, a datasets.Dataset or a list of dicts) and validate them per data shape.

Every bad record becomes a DataError naming source, 1-based row and field, so no later stage re-checks types.
Returned records are the input's fields, unchanged, plus `_source` and `_row` for later error messages.
"""

from __future__ import annotations

import codecs
import json
import logging
import math
import numbers
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from alignkit.data.formats import FormatError, split_implicit_prompt
from alignkit.data.sources import open_source
from alignkit.errors import ConfigError, DataError

logger = logging.getLogger("alignkit.data")

# Fields each data shape requires; any other field is kept as it is.
SHAPES: dict[str, tuple[str, ...]] = {
    "pairs": ("prompt", "chosen", "rejected"),
    "unpaired": ("prompt", "completion", "label"),
    "lists": ("prompt", "responses", "scores"),
    "sft": ("prompt", "completion"),
    # D2O: a human-labelled negative and K samples of the starting model for the same prompt (K the same everywhere).
    "negatives": ("prompt", "rejected", "samples"),
    # LOGO: one preferred response and M dis-preferred ones for the same prompt (M the same everywhere).
    "rejections": ("prompt", "chosen", "rejections"),
    "prompts": ("prompt",),
    # A whole conversation; every assistant turn is trained. An "sft" record may be a chat too (see fields_of).
    "chat": ("messages",),
}
# The shapes a loss may train on: the record shapes above but prompts and chat (read as sft), plus "rollouts": a
# prompt with k responses sampled by the policy and their rewards, made by alignkit.online, never read from a file.
DATA_SHAPES = ("pairs", "unpaired", "lists", "sft", "rollouts", "negatives", "rejections")
ON_BAD_RECORD = ("error", "skip")
PROMPT_ROLES = ("system", "user", "assistant", "tool")
RESPONSE_ROLES = ("assistant",)
JSONL_SUFFIXES = (".jsonl", ".ndjson")

_FILE_HINT = "check the path and the file"
_EMPTY_HINT = "the source holds no records; check the path or the split"


class _Invalid(Exception):
    """One bad field, before the source and row are attached."""

    def __init__(self, field: str | None, reason: str):
        super().__init__(reason)
        self.field, self.reason = field, reason


# ---------------------------------------------------------------------------------------------- public API


def load_records(
    source: Any, shape: str = "pairs", on_bad_record: str = "error", max_report: int = 5
) -> list[dict]:
    """Read and validate every record of `source` for `shape` (iter_records, into a list)."""
    return list(iter_records(source, shape, on_bad_record, max_report))


def iter_records(
    source: Any, shape: str = "pairs", on_bad_record: str = "error", max_report: int = 5
) -> Iterator[dict]:
    """Read and validate the records of `source` for `shape`, one at a time.

    source: a path to .jsonl/.ndjson (row = line number; blank lines are skipped but counted), .json (a list;
    row = 1-based index) or .parquet (row = 1-based index); a datasets.Dataset / IterableDataset; or a list
    of dicts (row = 1-based index). on_bad_record "error" raises the first DataError; "skip" drops bad
    records and logs one warning on logger "alignkit.data" with their count and the first `max_report`
    reasons. Unreadable, empty or all-bad sources raise DataError in either mode.
    """
    if shape not in SHAPES:
        raise ConfigError("shape", f"unknown data shape '{shape}'; known: {', '.join(SHAPES)}")
    if on_bad_record not in ON_BAD_RECORD:
        raise ConfigError("on_bad_record", f"must be 'error' or 'skip', got {on_bad_record!r}")
    if isinstance(max_report, bool) or not isinstance(max_report, int) or max_report < 0:
        raise ConfigError("max_report", f"must be an integer >= 0, got {max_report!r}")

    name, rows = open_source(source, READERS)
    n_good = 0
    bad: list[DataError] = []
    n_rows = 0
    counts: dict[str, tuple[int | None, int | None]] = {}  # list field -> (length in the first good record, its row)
    for file, row, value in rows:  # errors raised by the reader itself concern the whole source: never skipped
        n_rows += 1
        try:
            if isinstance(value, DataError):  # a row the reader could not parse
                raise value
            record = validate_record(value, shape, file, row)
            _check_same_counts(record, shape, counts, file, row)
        except DataError as err:
            if on_bad_record == "error":
                raise
            bad.append(err)
            continue
        n_good += 1
        yield record
    if n_rows == 0:
        raise DataError(name, None, None, "no records", hint=_EMPTY_HINT)
    if bad:
        reasons = "; ".join(_short(err) for err in bad[:max_report])
        more = f" (and {len(bad) - max_report} more)" if len(bad) > max_report else ""
        logger.warning(
            "%s: skipped %d bad record(s) of %d: %s%s", name, len(bad), n_rows, reasons or "-", more
        )
        if not n_good:
            raise DataError(
                name,
                None,
                None,
                f"all {n_rows} records are bad; first: {_short(bad[0])}",
                hint="fix the records",
            )


def check_both_labels(labels: Iterable, name: str) -> None:
    """An unpaired training set (KTO, BCO) with desirable and undesirable examples: one label alone is a data bug."""
    labels = {bool(label) for label in labels}
    if len(labels) == 1:
        raise DataError(name, None, "label", f"every record is labelled {labels.pop()}: an unpaired (KTO/BCO) set "
                        "needs desirable and undesirable examples", hint="add records of the other label")


def validate_record(record: Any, shape: str, source: str = "<memory>", row: int | None = None) -> dict:
    """One record checked against `shape`: a new dict with its fields plus `_source` and `_row`."""
    if shape not in SHAPES:
        raise ConfigError("shape", f"unknown data shape '{shape}'; known: {', '.join(SHAPES)}")
    if not isinstance(record, dict):
        raise DataError(source, row, None, f"record is not a JSON object (got {_kind(record)})")
    fields = fields_of(record, shape)
    try:
        if shape == "pairs" and "prompt" not in record and "chosen" in record and "rejected" in record:
            try:  # TRL's implicit prompt: two whole conversations sharing their beginning
                prompt, chosen, rejected = split_implicit_prompt(record["chosen"], record["rejected"])
            except FormatError as err:
                raise _Invalid(err.field, err.reason) from None
            record = {**record, "prompt": prompt, "chosen": chosen, "rejected": rejected}
        for field in fields:
            if field not in record:
                raise _Invalid(field, "missing field")
        if "prompt" in fields:
            _check_text(record["prompt"], "prompt", PROMPT_ROLES)
        for field in ("chosen", "rejected", "completion"):
            if field in fields:
                _check_text(record[field], field, RESPONSE_ROLES)
        if "messages" in fields:
            _check_chat(record["messages"])
        if "text" in fields:
            _check_string(record["text"], "text")
        if shape == "unpaired":
            _check_label(record["label"])
        if shape == "lists":
            _check_lists(record["responses"], record["scores"])
        if shape == "pairs" and record["chosen"] == record["rejected"]:
            raise _Invalid("rejected", "identical to chosen: the pair carries no training signal")
        for field in ("margin", "score_chosen", "score_rejected"):
            if shape == "pairs" and field in record:
                _check_number(record[field], field)
        if "tools" in record:
            _check_tools(record["tools"])
        if "short_prompt" in record:  # LongPO: the same question with the short context
            _check_text(record["short_prompt"], "short_prompt", PROMPT_ROLES)
        if shape == "pairs" and "other_rewards" in record:
            _check_other_rewards(record["other_rewards"])
        if shape == "negatives":
            _check_samples(record["samples"])
        if shape == "rejections":
            _check_samples(record["rejections"], "rejections", "dis-preferred responses")
    except _Invalid as bad:
        raise DataError(source, row, bad.field, bad.reason) from None
    return {**record, "_source": source, "_row": row}


def fields_of(record: dict, shape: str) -> tuple[str, ...]:
    """The fields `record` must have for `shape`: an "sft" record with `messages` and no `prompt` is a chat; one with
    only `text` is TRL's language-modelling format (every token trained)."""
    if shape == "sft" and "messages" in record and "prompt" not in record:
        return SHAPES["chat"]
    if shape == "sft" and "text" in record and "prompt" not in record and "messages" not in record:
        return ("text",)
    return SHAPES[shape]


def write_jsonl_atomic(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Write records as JSONL via a temporary file in the same folder and os.replace: never a partial file.

    Returns the number of records written. Creates the parent folder if needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        n_written = 0
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as out:
            for record in records:
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                n_written += 1
            out.flush()
            os.fsync(out.fileno())
        umask = os.umask(0)  # mkstemp makes the file 0600; give it the mode an ordinary open() would
        os.umask(umask)
        os.chmod(tmp_name, 0o666 & ~umask)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return n_written


# ---------------------------------------------------------------------------------------------- readers
# Each reader yields (row, value); a value that is a DataError is a row that could not be parsed.


def _read_jsonl(name: str) -> Iterator[tuple[int, Any]]:
    """One line at a time (memory stays flat however large the file). Lines split on b"\n" (JSON escapes newlines
    inside strings) and each is decoded alone, so a bad byte names its row and does not hide the rest."""
    try:
        handle = open(name, "rb")  # noqa: SIM115 - closed below, after the generator is drained
    except OSError as err:
        raise DataError(name, None, None, f"cannot read file ({err.strerror or err})", hint=_FILE_HINT) from None
    with handle:
        for row, line in enumerate(handle, start=1):
            if row == 1 and line.startswith(codecs.BOM_UTF8):
                line = line[len(codecs.BOM_UTF8):]
            if line.strip():
                yield row, _parse_line(line.rstrip(b"\n"), name, row)


def _parse_line(line: bytes, name: str, row: int) -> Any:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        bad_byte = line[err.start]
        return DataError(
            name, row, None, f"not valid UTF-8 (byte 0x{bad_byte:02x} at column {err.start + 1})"
        )
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        return DataError(name, row, None, f"malformed JSON ({err.msg} at column {err.colno})")
    except (ValueError, RecursionError) as err:  # e.g. integers too long to convert, nesting too deep
        return DataError(name, row, None, f"malformed JSON ({type(err).__name__}: {err})")


JSON_CHUNK = 1 << 20  # bytes read at a time from a .json list


def _read_json(name: str) -> Iterator[tuple[int, Any]]:
    """A .json file holding a list of records, decoded one element at a time from chunks of the file (memory stays
    at about one record); a file of one object per line is read as JSONL."""
    try:
        handle = open(name, "rb")  # noqa: SIM115 - closed below, after the generator is drained
    except OSError as err:
        raise DataError(name, None, None, f"cannot read file ({err.strerror or err})", hint=_FILE_HINT) from None
    with handle:
        stream = _JSONStream(handle, name)
        if stream.peek() != "[":
            handle.close()
            yield from _read_jsonl(name)
            return
        stream.pos += 1
        row = 0
        while True:
            if stream.peek() == "]":
                stream.pos += 1
                break
            if row and not stream.take(","):
                stream.fail("expected ',' or ']'")
            row += 1
            yield row, stream.value()
        if stream.peek() != "":
            stream.fail("extra data after the list")


class _JSONStream:
    """Text of a file decoded (UTF-8, BOM dropped) into a buffer that grows as values are decoded from it."""

    def __init__(self, handle, name: str):
        self.handle, self.name = handle, name
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")()
        self.decoder_json = json.JSONDecoder()
        self.buf, self.pos, self.eof, self.bytes_read = "", 0, False, 0
        self.lines_dropped, self.column_carry = 0, 0  # for error positions in the whole file

    def more(self, at_least: int = JSON_CHUNK) -> bool:
        if self.eof:
            return False
        dropped = self.buf[:self.pos]
        newlines = dropped.count("\n")
        self.lines_dropped += newlines
        self.column_carry = len(dropped) - dropped.rfind("\n") - 1 if newlines else self.column_carry + len(dropped)
        self.buf, self.pos = self.buf[self.pos:], 0
        data = self.handle.read(max(JSON_CHUNK, at_least))
        try:
            self.buf += self.decoder.decode(data, final=not data)
        except UnicodeDecodeError as err:
            raise DataError(self.name, None, None, f"not valid UTF-8 (byte offset {self.bytes_read + err.start})") from None
        self.bytes_read += len(data)
        self.eof = not data
        return True

    def peek(self) -> str:
        """The next non-space character ('' at the end), the position moved onto it."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf) or not self.more():
                return self.buf[self.pos:self.pos + 1]

    def take(self, char: str) -> bool:
        if self.peek() == char:
            self.pos += 1
            return True
        return False

    def value(self) -> Any:
        self.peek()
        while True:
            try:
                value, end = self.decoder_json.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as err:
                if self.more(len(self.buf)):  # maybe cut by the chunk's end: read as much again and retry
                    continue
                self.fail(err.msg, err.pos)
            except (ValueError, RecursionError) as err:  # e.g. integers too long to convert, nesting too deep
                raise DataError(self.name, None, None, f"malformed JSON ({type(err).__name__}: {err})") from None
            if end == len(self.buf) and self.more(len(self.buf)):  # a number may go on in the next chunk
                continue
            self.pos = end
            return value

    def fail(self, message: str, at: int | None = None):
        at = self.pos if at is None else at
        before = self.buf[:at]
        newlines = before.count("\n")
        column = at - before.rfind("\n") if newlines else self.column_carry + at + 1
        raise DataError(self.name, None, None, f"malformed JSON ({message} at line {self.lines_dropped + newlines + 1} "
                        f"column {column})")


def _read_parquet(name: str) -> Iterator[tuple[int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = 0
    try:
        for batch in pq.ParquetFile(name).iter_batches():
            for record in batch.to_pylist():
                row += 1
                yield row, record
    except (OSError, pa.ArrowException) as err:
        raise DataError(name, None, None, f"cannot read Parquet ({err})", hint=_FILE_HINT) from None


READERS = {".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}


# ---------------------------------------------------------------------------------------------- field checks


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
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise _Invalid(
                where, f"chat message must be an object with 'role' and 'content', got {_kind(message)}"
            )
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


def _check_chat(messages: Any) -> None:
    """A list of chat messages that opens with a system or user turn and holds at least one assistant turn."""
    if not isinstance(messages, (list, tuple)):
        raise _Invalid("messages", f"expected a list of chat messages, got {_kind(messages)}")
    _check_text(messages, "messages", PROMPT_ROLES)
    if messages[0]["role"] == "assistant":
        raise _Invalid("messages[0].role", "a chat must open with a 'system' or 'user' turn, got 'assistant'")
    if not any(message["role"] == "assistant" for message in messages):
        raise _Invalid("messages", "no 'assistant' turn: there is nothing to train on")


def _check_string(value: Any, field: str) -> None:
    if not isinstance(value, str):
        raise _Invalid(field, f"expected a non-empty string, got {_kind(value)}")
    if not value.strip():
        raise _Invalid(field, "empty string" if not value else "string is only whitespace")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # JSON "\ud800" escapes decode to lone surrogates that tokenizers reject
        raise _Invalid(field, "string holds an unpaired surrogate (not valid Unicode)") from None


def _check_label(value: Any) -> None:
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return
    raise _Invalid("label", f"expected true/false or 0/1, got {_kind(value)} {_preview(value)}")


def _check_number(value: Any, field: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _Invalid(field, f"expected a number, got {_kind(value)}")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        finite = False
    if not finite:
        raise _Invalid(field, f"must be a finite number, got {_preview(value)}")


def _check_lists(responses: Any, scores: Any) -> None:
    if not isinstance(responses, (list, tuple)):
        raise _Invalid("responses", f"expected a list of responses, got {_kind(responses)}")
    if len(responses) < 2:
        raise _Invalid("responses", f"needs at least 2 responses, got {len(responses)}")
    for i, response in enumerate(responses):
        _check_text(response, f"responses[{i}]", RESPONSE_ROLES)
    if not isinstance(scores, (list, tuple)):
        raise _Invalid("scores", f"expected a list of numbers, got {_kind(scores)}")
    for i, score in enumerate(scores):
        if isinstance(score, bool) or not isinstance(score, numbers.Real):
            raise _Invalid(f"scores[{i}]", f"expected a number, got {_kind(score)}")
        try:
            finite = math.isfinite(score)
        except OverflowError:  # an integer too large for a float
            finite = False
        if not finite:
            raise _Invalid(f"scores[{i}]", f"score must be a finite number, got {_preview(score)}")
    if len(scores) != len(responses):
        raise _Invalid(
            "scores", f"has {len(scores)} scores for {len(responses)} responses; give one per response"
        )
    if len(set(scores)) == 1:
        raise _Invalid("scores", f"all {len(scores)} scores tie: the list ranks nothing")


def _check_samples(samples: Any, field: str = "samples", what: str = "the model's own responses") -> None:
    if not isinstance(samples, (list, tuple)):
        raise _Invalid(field, f"expected a list of {what}, got {_kind(samples)}")
    if not samples:
        raise _Invalid(field, f"needs at least 1 of {what}")
    for i, sample in enumerate(samples):
        _check_text(sample, f"{field}[{i}]", RESPONSE_ROLES)


def _check_other_rewards(value: Any) -> None:
    """MODPO: {"chosen": [r_1..r_K], "rejected": [r_1..r_K]}, the other objectives' rewards of each response."""
    if not isinstance(value, dict):
        raise _Invalid("other_rewards", 'expected an object {"chosen": [...], "rejected": [...]}, '
                                        f"got {_kind(value)}")
    for side in ("chosen", "rejected"):
        rewards = value.get(side)
        if not isinstance(rewards, (list, tuple)) or not rewards:
            raise _Invalid(f"other_rewards.{side}", f"expected a non-empty list of numbers, got {_kind(rewards)}")
        for i, reward in enumerate(rewards):
            _check_number(reward, f"other_rewards.{side}[{i}]")
    if len(value["chosen"]) != len(value["rejected"]):
        raise _Invalid("other_rewards", f"has {len(value['chosen'])} chosen and {len(value['rejected'])} rejected "
                                        "rewards; give one per objective for each")


# List fields whose length must be the same in every record of a data set (a batch packs a fixed number of
# responses per example; a loss weights a fixed number of objectives).
_SAME_COUNT_FIELDS = {"negatives": ("samples",), "rejections": ("rejections",), "pairs": ("other_rewards",)}


def _check_tools(value: Any) -> None:
    """TRL's `tools` column: function schemas (JSON objects) handed to the chat template."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(t, dict) for t in value):
        raise _Invalid("tools", f"expected a list of tool schemas (JSON objects), got {_kind(value)}")


def _check_same_counts(record: dict, shape: str, counts: dict[str, tuple[int | None, int | None]], source: str,
                       row: int | None) -> None:
    """A list field that one record has, every record has, with as many entries (None: the field is absent)."""
    for field in _SAME_COUNT_FIELDS.get(shape, ()):
        value = record.get(field)
        n = None if value is None else len(value["chosen"]) if isinstance(value, dict) else len(value)
        first, first_row = counts.setdefault(field, (n, row))
        if n != first:
            have = "is missing" if n is None else f"has {n} entries"
            other = "has it" if n is None else "has none" if first is None else f"has {first}"
            raise DataError(source, row, field, f"{have} but row {first_row} {other}; every record needs the same "
                            "number")


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


def _short(err: DataError) -> str:
    where = f"row {err.row}" if err.row is not None else "source"
    if err.field is not None:
        where += f", field '{err.field}'"
    return f"{where}: {err.reason}"
