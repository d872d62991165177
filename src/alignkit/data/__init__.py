"""Data: load + validate records, render chat templates, tokenise, pack."""

from __future__ import annotations

from alignkit.data.table import ExampleTable
from alignkit.data.tokenize import TokenizedExample


def prepare_examples(source, tokenizer, shape: str, max_length: int, max_prompt_length: int | None = None,
                     on_bad_record: str = "error", training: bool = False, cache: bool = False,
                     progress: bool = False) -> ExampleTable:
    """records (file / folder / dataset / list) -> validated -> tokenised examples, streamed: records are read,
    rendered and encoded a batch at a time into a compact table (data/table.py), never all held at once. training: also the checks a whole
    training set must pass (an unpaired set needs both labels). cache: reuse the examples a previous run tokenised
    from the same files with the same tokenizer and settings (data/cache.py)."""
    from alignkit.data.cache import cached
    from alignkit.data.load import check_both_labels, iter_records
    from alignkit.data.table import build_table
    from alignkit.data.tokenize import tokenize_stream

    def build():
        records = iter_records(source, shape=shape, on_bad_record=on_bad_record)
        examples = tokenize_stream(tokenizer, records, shape, max_length, max_prompt_length, on_bad_record, progress)
        table = build_table(examples)
        if training and shape == "unpaired":
            check_both_labels((extras["label"] for extras in table.extras), table.sources[0])
        return table

    settings = {"shape": shape, "max_length": max_length, "max_prompt_length": max_prompt_length,
                "on_bad_record": on_bad_record, "training": training}
    return cached(source, tokenizer, settings, build) if cache else build()


__all__ = ["ExampleTable", "TokenizedExample", "prepare_examples"]
