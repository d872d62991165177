"""Opening a data source: a file, a folder (written by datasets' save_to_disk, or holding .jsonl/.json/.parquet
files), a glob, a hub dataset id, a datasets.Dataset or a list of dicts. Every source yields (file, row, record)
with the row 1-based within its file, so an error names the file a bad record is in; JSONL is read a line at a time.

A hub id is loaded through datasets.load_dataset; without network (or with HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set)
it fails at once with one line naming the id."""

from __future__ import annotations

import glob
import os
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from alignkit.config import DataSource
from alignkit.errors import DataError

FILE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_FILE_HINT = "check the path and the file"

Rows = Iterator[tuple[str, int, Any]]


def open_source(source: Any, readers: dict) -> tuple[str, Rows]:
    """(the source's name, its rows). readers: suffix -> f(path) -> Iterator[(row, value)] (data/load's)."""
    if isinstance(source, dict) and "path" in source:
        source = DataSource(**source)
    if isinstance(source, DataSource):
        name, rows = _open_plain(source.path, readers, source.name, source.split)
        return name, _subsample(rows, source.num_samples, source.shuffle_seed)
    return _open_plain(source, readers)


def _open_plain(source: Any, readers: dict, config_name: str | None = None, split: str | None = None):
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        path = Path(name)
        if path.is_dir() and saved_dataset(path):
            return name, _dataset_rows(_load_from_disk(name, split), name)
        if path.is_dir() or glob.has_magic(name):
            return name, _files([str(f) for f in record_files(name)], name, readers)
        suffix = path.suffix.lower()
        if suffix in readers:
            return name, ((name, row, value) for row, value in readers[suffix](name))
        if not path.exists() and _HUB_ID.match(name) and not suffix:
            return name, _dataset_rows(_load_hub(name, config_name, split), name)
        if not path.exists():
            raise DataError(name, None, None, "no such file, folder or hub dataset", hint=_FILE_HINT)
        raise DataError(name, None, None, f"unsupported file type '{suffix}'",
                        hint="use .jsonl, .json or .parquet, a folder of them, or a save_to_disk folder")
    if isinstance(source, (list, tuple)):
        return "<memory>", (("<memory>", row, value) for row, value in enumerate(source, start=1))
    if type(source).__module__.startswith("datasets"):
        return "<dataset>", _dataset_rows(_one_split(source, split, "<dataset>"), "<dataset>")
    raise DataError("<source>", None, None, f"cannot read records from a {type(source).__name__}",
                    hint="pass a .jsonl/.json/.parquet path, a folder, a glob, a hub id, a datasets.Dataset or a "
                         "list of dicts")


def saved_dataset(path: Path) -> bool:
    """A folder written by datasets' save_to_disk (a Dataset or a DatasetDict)."""
    return any((path / f).exists() for f in ("dataset_info.json", "dataset_dict.json", "state.json"))


def record_files(name: str) -> list[Path] | None:
    """The files a path source reads, sorted: the file itself; a folder's or a glob's .jsonl/.json/.parquet files (a
    save_to_disk folder: every file in it); None where no local file is meant (a hub id)."""
    path = Path(name)
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(f for f in path.rglob("*") if f.is_file() and (saved_dataset(path) or
                                                                     f.suffix.lower() in FILE_SUFFIXES))
    if glob.has_magic(name):
        return sorted(Path(f) for f in glob.glob(name, recursive=True) if Path(f).suffix.lower() in FILE_SUFFIXES)
    return None


def _files(paths: list[str], name: str, readers: dict) -> Rows:
    if not paths:
        raise DataError(name, None, None, "no .jsonl, .json or .parquet files here", hint=_FILE_HINT)
    for path in paths:
        for row, value in readers[Path(path).suffix.lower()](path):
            yield path, row, value


def _one_split(dataset, split: str | None, name: str):
    import datasets

    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split is None:
            raise DataError(name, None, None, f"holds the splits {', '.join(dataset)}",
                            hint="name one with split: (e.g. `train_data: {path: ..., split: train}`)")
        if split not in dataset:
            raise DataError(name, None, None, f"has no split '{split}'; it has {', '.join(dataset)}",
                            hint="name one of those")
        return dataset[split]
    return dataset


def _dataset_rows(dataset, name: str) -> Rows:
    for row, value in enumerate(dataset.with_format(None), start=1):
        yield name, row, value


def _load_from_disk(name: str, split: str | None):
    import datasets

    try:
        dataset = datasets.load_from_disk(name)
    except (OSError, ValueError) as err:
        raise DataError(name, None, None, f"cannot read the save_to_disk folder ({err})", hint=_FILE_HINT) from None
    return _one_split(dataset, split, name)


def _load_hub(name: str, config_name: str | None, split: str | None):
    """datasets.load_dataset(name, config_name, split=split); offline, a one-line error at once."""
    offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE",
                                                                                   "HF_DATASETS_OFFLINE"))
    if offline or not _hub_reachable():
        raise DataError(name, None, None, "is not a local file or folder, and the Hugging Face hub is unreachable "
                        "(offline)", hint="download it where the hub is reachable and pass the folder "
                        "(datasets' save_to_disk), or fix the path")
    import datasets

    try:
        dataset = datasets.load_dataset(name, config_name, split=split)
    except Exception as err:  # noqa: BLE001 - datasets raises many kinds (hub, network, builder); each is one line
        raise DataError(name, None, None, f"cannot load the hub dataset ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''})", hint="check the id, config and split") \
            from None
    return _one_split(dataset, split, name)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A TCP connection to the hub's endpoint within `timeout` s (datasets would otherwise retry for minutes)."""
    import socket
    from urllib.parse import urlparse

    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _subsample(rows: Rows, n: int | None, seed: int | None) -> Rows:
    """The first n rows, or (with a seed) n rows drawn without replacement in file order; rows keep their numbers."""
    if n is None:
        yield from rows
        return
    if seed is None:
        for i, item in enumerate(rows):
            if i >= n:
                return
            yield item
        return
    everything = list(rows)
    keep = sorted(random.Random(seed).sample(range(len(everything)), min(n, len(everything))))
    for i in keep:
        yield everything[i]

