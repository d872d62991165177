"""Read records (JSONL, JSON, Parquet, a datasets.Dataset or a list of dicts) and validate them per data shape
(data/sources.py opens a source, data/readers.py reads its files, data/validate.py checks each record).

Every bad record becomes a DataError naming source, 1-based row and field, so no later stage re-checks types.
Returned records are the input's fields, unchanged, plus `_source` and `_row` for later error messages.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from alignkit.data.readers import READERS
from alignkit.data.sources import open_source
from alignkit.data.validate import check_same_counts, check_shape, validate_record
from alignkit.errors import ConfigError, DataError

logger = logging.getLogger("alignkit.data")

ON_BAD_RECORD = ("error", "skip")
_EMPTY_HINT = "the source holds no records; check the path or the split"


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
    check_shape(shape)
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
            check_same_counts(record, shape, counts, file, row)
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


def _short(err: DataError) -> str:
    where = f"row {err.row}" if err.row is not None else "source"
    if err.field is not None:
        where += f", field '{err.field}'"
    return f"{where}: {err.reason}"
