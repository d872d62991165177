"""Tokenised examples cached on disk, keyed by the source (its files' paths, sizes and modification times, or a
Dataset's fingerprint), the tokenizer (vocabulary, merges, chat template, special tokens) and the settings that
change tokenisation, so a second run over the same data skips reading and tokenising it. In-memory lists and hub
ids are not cached (nothing cheap identifies them). Files are written atomically; an unreadable one is rebuilt."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path

from alignkit.config import DataSource
from alignkit.data.sources import record_files

log = logging.getLogger("alignkit.data")
CACHE_VERSION = 3  # bump when tokenisation changes what it produces


def cache_dir() -> Path:
    return Path(os.environ.get("ALIGNKIT_CACHE", Path.home() / ".cache" / "alignkit"))


def source_fingerprint(source) -> str | None:
    """What identifies a source's content cheaply; None: do not cache it."""
    options = {}
    if isinstance(source, dict) and "path" in source:
        source = DataSource(**source)
    if isinstance(source, DataSource):
        options = source.model_dump(exclude={"path"})
        source = source.path
    if isinstance(source, (str, os.PathLike)):
        files = record_files(os.fspath(source))
        if not files:
            return None
        stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
        return json.dumps({"files": stats, **options}, sort_keys=True)
    fingerprint = getattr(source, "_fingerprint", None)  # datasets.Dataset
    return json.dumps({"dataset": fingerprint, **options}) if isinstance(fingerprint, str) else None


def tokenizer_fingerprint(tokenizer) -> str:
    digest = hashlib.blake2b(digest_size=16)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update(backend.to_str().encode() if backend is not None else repr(sorted(tokenizer.get_vocab().items())).encode())
    for part in (tokenizer.chat_template, tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token,
                 type(tokenizer).__name__):
        digest.update(repr(part).encode())
    return digest.hexdigest()


def cached(source, tokenizer, settings: dict, build: Callable[[], list]) -> list:
    """build() on a miss, saved under the key of (source, tokenizer, settings); the saved list on a hit."""
    fingerprint = source_fingerprint(source)
    if fingerprint is None:
        return build()
    key = hashlib.blake2b(json.dumps([CACHE_VERSION, fingerprint, tokenizer_fingerprint(tokenizer), settings],
                                     sort_keys=True, default=str).encode(), digest_size=16).hexdigest()
    path = cache_dir() / "examples" / f"{key}.pkl"
    if path.exists():
        try:
            with path.open("rb") as f:
                examples = pickle.load(f)
            log.info("tokenised examples: cache hit %s (%d examples)", path.name, len(examples))
            return examples
        except Exception as err:  # noqa: BLE001 - a broken cache file is rebuilt, not fatal
            log.warning("examples cache %s unreadable (%s); rebuilding", path, err)
    examples = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump(examples, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)
    except OSError as err:  # a read-only cache folder only costs the next run the tokenisation
        log.warning("could not write the examples cache %s (%s)", path, err)
        Path(tmp).unlink(missing_ok=True)
    return examples
