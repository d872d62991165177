"""Text segments -> token ids, with the truncation policy.

Truncation: the prompt keeps its END (the most recent turns matter most) down to max_prompt_length;
each response keeps its START, down to max_length - len(prompt). A prompt that alone fills max_length
is an error (there would be no room for any response), named by file, row and field.

A chat (shape "chat", or an "sft" record holding `messages`) becomes one example with k = 1: the prompt is the
conversation up to the first assistant turn, the response is everything after it, and `response_loss_masks`
marks which response tokens (those of assistant turns) carry loss."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from alignkit.data.template import render, render_chat_turns
from alignkit.errors import DataError

# Which record fields hold the responses, per data shape.
RESPONSE_FIELDS = {
    "pairs": lambda r: ["chosen", "rejected"],
    "unpaired": lambda r: ["completion"],
    "sft": lambda r: ["completion"],
    "lists": lambda r: [f"responses[{i}]" for i in range(len(r["responses"]))],
    "negatives": lambda r: ["rejected", *(f"samples[{i}]" for i in range(len(r["samples"])))],
    "rejections": lambda r: ["chosen", *(f"rejections[{i}]" for i in range(len(r["rejections"])))],
}


@dataclass
class TokenizedExample:
    prompt_ids: list[int]
    response_ids: list[list[int]]
    source: str = "<memory>"
    row: int | None = None
    extras: dict = field(default_factory=dict)  # label, scores, margin, ... carried to the loss
    # Per response, True where a token carries loss; None: every response token does (all shapes but chats).
    response_loss_masks: list[list[bool]] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + sum(len(r) for r in self.response_ids)

    @property
    def trained_lengths(self) -> list[int]:
        """Loss-carrying tokens of each response."""
        if self.response_loss_masks is None:
            return [len(r) for r in self.response_ids]
        return [sum(mask) for mask in self.response_loss_masks]


def train_on_prompt(example: TokenizedExample) -> TokenizedExample:
    """The example with its prompt trained too (SFT's `sft_include_prompt`): the prompt shrinks to its first
    token, which nothing predicts, and the rest of it joins the single response, every token trained."""
    if len(example.response_ids) != 1:
        raise ValueError("training on the prompt needs examples with one response")
    response = example.prompt_ids[1:] + example.response_ids[0]
    return TokenizedExample(example.prompt_ids[:1], [response], example.source, example.row, dict(example.extras))


def _response_values(record: dict, shape: str) -> tuple[list, list[str]]:
    fields = RESPONSE_FIELDS[shape](record)
    if shape == "lists":
        return list(record["responses"]), fields
    if shape == "negatives":
        return [record["rejected"], *record["samples"]], fields
    if shape == "rejections":
        return [record["chosen"], *record["rejections"]], fields
    return [record[f] for f in fields], fields


def tokenize_record(tokenizer, record: dict, shape: str, max_length: int,
                    max_prompt_length: int | None = None) -> TokenizedExample:
    source, row = record.get("_source", "<memory>"), record.get("_row")
    if shape == "chat" or shape == "sft" and "messages" in record and "prompt" not in record:
        return tokenize_chat(tokenizer, record, max_length, max_prompt_length)
    responses, fields = _response_values(record, shape)
    prompt_text, response_texts = render(tokenizer, record["prompt"], responses, source, row, fields,
                                         record.get("tools"))
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
    if shape == "pairs" and response_ids[0] == response_ids[1]:
        raise DataError(source, row, "rejected", "identical to chosen after templating and tokenisation: the pair "
                        "carries no training signal")
    extras = {k: record[k] for k in ("label", "scores", "margin", "other_rewards") if k in record}
    if "short_prompt" in record:  # LongPO: the reference reads the same responses after the short context
        extras["short_prompt"] = _short_prompt_ids(tokenizer, record, responses, fields, response_ids)
    return TokenizedExample(prompt_ids, response_ids, source, row, extras)


def _short_prompt_ids(tokenizer, record: dict, responses: list, fields: list[str], response_ids) -> list[int]:
    source, row = record.get("_source", "<memory>"), record.get("_row")
    short_text, short_responses = render(tokenizer, record["short_prompt"], responses, source, row, fields,
                                         record.get("tools"))
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:len(r)] for t, r in zip(short_responses, response_ids)]
    if ids != response_ids:
        raise DataError(source, row, "short_prompt", "the responses tokenize differently after the short prompt "
                        "than after the long one; the reference must score the same tokens")
    return tokenizer(short_text, add_special_tokens=False)["input_ids"]


def tokenize_chat(tokenizer, record: dict, max_length: int, max_prompt_length: int | None = None) -> TokenizedExample:
    """A conversation -> one example: prompt = the turns before the first assistant turn (with its generation
    prompt), response = the rest, masked to the assistant turns. Truncation as for any example."""
    source, row = record.get("_source", "<memory>"), record.get("_row")
    pieces = render_chat_turns(tokenizer, record["messages"], source, row, tools=record.get("tools"))
    prompt_text, prompt_trained = pieces[0]
    prompt_ids = [] if prompt_trained else tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    if not prompt_ids:
        raise DataError(source, row, "messages", "the turns before the first assistant turn tokenize to zero tokens")
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        prompt_ids = prompt_ids[-max_prompt_length:]
    if len(prompt_ids) >= max_length:
        raise DataError(source, row, "messages", f"the turns before the first assistant turn are {len(prompt_ids)} "
                        f"tokens, not shorter than max_length {max_length}",
                        hint="raise max_length, set max_prompt_length, or set on_bad_record: skip")
    response_ids: list[int] = []
    loss_mask: list[bool] = []
    for text, trained in pieces[1:]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        response_ids += ids
        loss_mask += [trained] * len(ids)
    room = max_length - len(prompt_ids)
    response_ids, loss_mask = response_ids[:room], loss_mask[:room]
    if not any(loss_mask):
        raise DataError(source, row, "messages", "the assistant turns tokenize to zero tokens")
    while not loss_mask[-1]:  # untrained tokens at the end (a turn cut by truncation) would only cost compute
        response_ids.pop()
        loss_mask.pop()
    return TokenizedExample(prompt_ids, [response_ids], source, row, response_loss_masks=[loss_mask])


def tokenize_records(tokenizer, records: list[dict], shape: str, max_length: int, max_prompt_length: int | None = None,
                     on_bad_record: str = "error", progress: bool = False) -> list[TokenizedExample]:
    """Tokenise every record; with on_bad_record='skip', records that cannot fit are dropped and counted.
    progress: a progress bar (rich) over the records."""
    examples, bad = [], []
    for record in _with_progress(records, progress):
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


def _with_progress(records: list, show: bool):
    if not show or len(records) < 1000:
        yield from records
        return
    from rich.progress import track

    yield from track(records, description="tokenising", transient=True)
