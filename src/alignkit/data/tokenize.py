"""Text segments -> token ids, with the truncation policy.

Truncation: the prompt keeps its END (the most recent turns matter most) down to max_prompt_length;
each response keeps its START, down to max_length - len(prompt). A prompt that alone fills max_length
is an error (there would be no room for any response), named by file, row and field."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from alignkit.data.template import render
from alignkit.errors import DataError

# Which record fields hold the responses, per data shape.
RESPONSE_FIELDS = {
    "pairs": lambda r: ["chosen", "rejected"],
    "unpaired": lambda r: ["completion"],
    "sft": lambda r: ["completion"],
    "lists": lambda r: [f"responses[{i}]" for i in range(len(r["responses"]))],
}


@dataclass
class TokenizedExample:
    prompt_ids: list[int]
    response_ids: list[list[int]]
    source: str = "<memory>"
    row: int | None = None
    extras: dict = field(default_factory=dict)  # label, scores, ... carried to the loss

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + sum(len(r) for r in self.response_ids)


def _response_values(record: dict, shape: str) -> tuple[list, list[str]]:
    fields = RESPONSE_FIELDS[shape](record)
    if shape == "lists":
        return list(record["responses"]), fields
    return [record[f] for f in fields], fields


def tokenize_record(tokenizer, record: dict, shape: str, max_length: int,
                    max_prompt_length: int | None = None) -> TokenizedExample:
    source, row = record.get("_source", "<memory>"), record.get("_row")
    responses, fields = _response_values(record, shape)
    prompt_text, response_texts = render(tokenizer, record["prompt"], responses, source, row, fields)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        prompt_ids = prompt_ids[-max_prompt_length:]
    if len(prompt_ids) >= max_length:
        raise DataError(source, row, "prompt", f"prompt is {len(prompt_ids)} tokens, not shorter than max_length "
                        f"{max_length}", hint="raise max_length, set max_prompt_length, or set on_bad_record: skip")
    room = max_length - len(prompt_ids)
    response_ids = []
    for text, name in zip(response_texts, fields):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:room]
        if not ids:
            raise DataError(source, row, name, "response tokenizes to zero tokens")
        response_ids.append(ids)
    extras = {k: record[k] for k in ("label", "scores") if k in record}
    return TokenizedExample(prompt_ids, response_ids, source, row, extras)


def tokenize_records(tokenizer, records: list[dict], shape: str, max_length: int, max_prompt_length: int | None = None,
                     on_bad_record: str = "error") -> list[TokenizedExample]:
    """Tokenise every record; with on_bad_record='skip', records that cannot fit are dropped and counted."""
    examples, bad = [], []
    for record in records:
        try:
            examples.append(tokenize_record(tokenizer, record, shape, max_length, max_prompt_length))
        except DataError as err:
            if on_bad_record != "skip":
                raise
            bad.append(str(err))
    if bad:
        logging.getLogger("alignkit.data").warning("skipped %d record(s) at tokenisation; first: %s", len(bad), bad[:5])
    if not examples:
        raise DataError(records[0].get("_source", "<memory>") if records else "<memory>", None, None,
                        "no usable records after tokenisation")
    return examples
