"""Data: load + validate records, render chat templates, tokenise, pack."""

from __future__ import annotations

from alignkit.data.tokenize import TokenizedExample, tokenize_records


def prepare_examples(source, tokenizer, shape: str, max_length: int, max_prompt_length: int | None = None,
                     on_bad_record: str = "error", training: bool = False) -> list[TokenizedExample]:
    """records (file / dataset / list) -> validated -> tokenised examples. training: also the checks a whole training
    set must pass (an unpaired set needs both labels)."""
    from alignkit.data.load import check_both_labels, load_records

    records = load_records(source, shape=shape, on_bad_record=on_bad_record)
    if training and shape == "unpaired":
        check_both_labels(records, records[0].get("_source", "<memory>"))
    return tokenize_records(tokenizer, records, shape, max_length, max_prompt_length, on_bad_record)


__all__ = ["TokenizedExample", "prepare_examples"]
