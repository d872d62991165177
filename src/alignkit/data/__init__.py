"""Data: load + validate records, render chat templates, tokenise, pack."""

from __future__ import annotations

from alignkit.data.tokenize import TokenizedExample, tokenize_records


def prepare_examples(source, tokenizer, shape: str, max_length: int, max_prompt_length: int | None = None,
                     on_bad_record: str = "error", training: bool = False, cache: bool = False,
                     progress: bool = False) -> list[TokenizedExample]:
    """records (file / folder / dataset / list) -> validated -> tokenised examples. training: also the checks a whole
    training set must pass (an unpaired set needs both labels). cache: reuse the examples a previous run tokenised
    from the same files with the same tokenizer and settings (data/cache.py)."""
    from alignkit.data.cache import cached
    from alignkit.data.load import check_both_labels, load_records

    def build():
        records = load_records(source, shape=shape, on_bad_record=on_bad_record)
        if training and shape == "unpaired":
            check_both_labels(records, records[0].get("_source", "<memory>"))
        return tokenize_records(tokenizer, records, shape, max_length, max_prompt_length, on_bad_record, progress)

    settings = {"shape": shape, "max_length": max_length, "max_prompt_length": max_prompt_length,
                "on_bad_record": on_bad_record, "training": training}
    return cached(source, tokenizer, settings, build) if cache else build()


__all__ = ["TokenizedExample", "prepare_examples"]
