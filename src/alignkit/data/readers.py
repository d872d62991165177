"""Reading the records of one file, streamed: JSONL a line at a time, a .json list an element at a time, Parquet a
batch at a time. Each reader yields (row, value), the row 1-based; a value that is a DataError is a row that could not
be parsed, and an error about the whole file is raised."""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from typing import Any

from alignkit.errors import DataError

_FILE_HINT = "check the path and the file"


def read_jsonl(name: str) -> Iterator[tuple[int, Any]]:
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


def read_json(name: str) -> Iterator[tuple[int, Any]]:
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
            yield from read_jsonl(name)
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


def read_parquet(name: str) -> Iterator[tuple[int, Any]]:
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


READERS = {".jsonl": read_jsonl, ".ndjson": read_jsonl, ".json": read_json, ".parquet": read_parquet}
