"""Errors are values with names: what went wrong, where, and what to do about it."""

from __future__ import annotations


class AlignkitError(Exception):
    """Base class for every error alignkit raises on purpose (the CLI prints these without a traceback)."""

    def __reduce__(self):
        """Pickled as its message and fields, so one raised in a Ray actor or a worker process reaches the caller as
        itself (the default re-calls __init__ with the message alone, which subclasses' signatures refuse)."""
        return _rebuilt, (type(self), self.args, self.__dict__)


def _rebuilt(cls, args: tuple, fields: dict) -> AlignkitError:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(fields)
    return error


class DataError(AlignkitError):
    """A bad record: names the file, the 1-based row and the field."""

    def __init__(self, file: str, row: int | None, field: str | None, reason: str, hint: str | None = None):
        self.file, self.row, self.field, self.reason = file, row, field, reason
        where = str(file)
        if row is not None:
            where += f", row {row}"
        if field is not None:
            where += f", field '{field}'"
        hint = hint if hint is not None else "fix the record or set on_bad_record: skip"
        super().__init__(f"{where}: {reason}" + (f"; {hint}" if hint else ""))


class ConfigError(AlignkitError):
    """A bad configuration value: names the key."""

    def __init__(self, key: str, reason: str):
        self.key, self.reason = key, reason
        super().__init__(f"config key '{key}': {reason}")
