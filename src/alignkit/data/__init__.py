"""Data: load + validate records, render chat templates, tokenise, pack."""

from __future__ import annotations

from dataclasses import asdict

from alignkit.data.table import ExampleTable
from alignkit.data.tokenize import ExampleSettings, TokenizedExample


def prepare_examples(source, tokenizer, settings: ExampleSettings, cache: bool = False,
                     progress: bool = False) -> ExampleTable:
    """records (file / folder / dataset / list) -> validated -> tokenised examples, streamed: records are read,
    rendered and encoded a batch at a time into a compact table (data/table.py), never all held at once. cache:
    reuse the examples a previous run tokenised from the same files with the same tokenizer and settings
    (data/cache.py). progress: a progress bar over the records."""
    from alignkit.data.cache import cached
    from alignkit.data.load import check_both_labels, iter_records
    from alignkit.data.table import build_table
    from alignkit.data.tokenize import tokenize_stream

    def build():
        records = iter_records(source, shape=settings.shape, on_bad_record=settings.on_bad_record)
        table = build_table(tokenize_stream(tokenizer, records, settings, progress))
        if settings.training and settings.shape == "unpaired":
            check_both_labels((extras["label"] for extras in table.extras), table.sources[0])
        return table

    return cached(source, tokenizer, asdict(settings), build) if cache else build()


__all__ = ["ExampleSettings", "ExampleTable", "TokenizedExample", "prepare_examples"]
