"""Errors are values with names: what went wrong, where, and what to do about it."""

from __future__ import annotations


class AlignkitError(Exception):
    """Base class for every error alignkit raises on purpose (the CLI prints these without a traceback)."""


class DataError(AlignkitError):
    """A bad record: names the file, the 1-based row and the field."""

    def __init__(self, file: str, row: int | None, field: str | None, reason: str, hint: str | None = None):
        self.file, self.row, self.field, self.reason, self.hint = file, row, field, reason, hint
        where = str(file)
        if row is not None:
            where += f", row {row}"
        if field is not None:
            where += f", field '{field}'"
        hint = hint if hint is not None else "fix the record or set on_bad_record: skip"
        super().__init__(f"{where}: {reason}" + (f"; {hint}" if hint else ""))

    def __reduce__(self):  # raised in a Ray actor or a worker process, it reaches the caller as itself
        return type(self), (self.file, self.row, self.field, self.reason, self.hint)


class ConfigError(AlignkitError):
    """A bad configuration value: names the key."""

    def __init__(self, key: str, reason: str):
        self.key, self.reason = key, reason
        super().__init__(f"config key '{key}': {reason}")

    def __reduce__(self):
        return type(self), (self.key, self.reason)
