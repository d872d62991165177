"""Text segments -> token ids, with the truncation policy.

Truncation: the prompt keeps its END (the most recent turns matter most) down to max_prompt_length;
each response keeps its START, down to max_length - len(prompt). A prompt that alone fills max_length
is an error (there would be no room for any response), named by file, row and field.

A chat (shape "chat", or an "sft" record holding `messages`) becomes one example with k = 1: the prompt is the
conversation up to the first assistant turn, the response is everything after it, and `response_loss_masks`
marks which response tokens (those of assistant turns) carry loss."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sized
from dataclasses import dataclass, field
from itertools import islice

from alignkit.data.template import render, render_chat_turns
from alignkit.errors import DataError
from alignkit.shapes import SHAPES, fields_of

# Which record fields hold the responses, per data shape.
RESPONSE_FIELDS = {
    "pairs": lambda r: ["chosen", "rejected"],
    "unpaired": lambda r: ["completion"],
    "sft": lambda r: ["completion"],
    "lists": lambda r: [f"responses[{i}]" for i in range(len(r["responses"]))],
    "negatives": lambda r: ["rejected", *(f"samples[{i}]" for i in range(len(r["samples"])))],
    "rejections": lambda r: ["chosen", *(f"rejections[{i}]" for i in range(len(r["rejections"])))],
}


@dataclass(frozen=True)
class ExampleSettings:
    """How records become examples; with the source and the tokenizer, also what the example cache is keyed on."""

    shape: str
    max_length: int
    max_prompt_length: int | None = None
    on_bad_record: str = "error"  # or "skip": drop (and count) the records that cannot be used
    training: bool = False  # also the checks a whole training set must pass (an unpaired set needs both labels)


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


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of many texts in one call, each as tokenizer(text, add_special_tokens=False) gives it: a fast
    tokenizer's batch encoder (Rust, on every core, no offsets computed); any other tokenizer's batched call."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return list(tokenizer(texts, add_special_tokens=False)["input_ids"])


@dataclass
class _Plan:
    """What a record's texts are, so their token ids can be put together after one batched encoding call."""
    fields: list[str]  # the response fields
    trained: list[bool] | None = None  # a chat: whether each text piece is an assistant turn
    short: bool = False  # LongPO: the texts end with the short prompt and the responses after it
    pair: bool = False  # a chosen/rejected pair: identical sides are an error
    text: bool = False  # one text, every token trained: its first token is the prompt nothing predicts
    harmful: bool = False  # the texts end with harmful_completion as a response, then its bare content


def render_record(tokenizer, record: dict, shape: str) -> tuple[list[str], _Plan]:
    """The texts a record is tokenised as: a chat's pieces; else the prompt, each response and, for LongPO, the
    short prompt and each response after it."""
    source, row = record.get("_source", "<memory>"), record.get("_row")
    if "harmful_completion" in record and (_is_text(record, shape) or _is_chat(record, shape)):
        raise DataError(source, row, "harmful_completion", "goes with prompt/completion records, not 'messages' or "
                        "'text'", hint="write the record as prompt + completion (the refusal)")
    if _is_text(record, shape):  # TRL's language-modelling format: EOS appended, as TRL's SFT does
        return [record["text"] + (tokenizer.eos_token or "")], _Plan(["text"], text=True)
    if _is_chat(record, shape):
        pieces = render_chat_turns(tokenizer, record["messages"], (source, row), tools=record.get("tools"))
        return [text for text, _ in pieces], _Plan(["messages"], trained=[trained for _, trained in pieces])
    responses, fields = _response_values(record, shape)
    prompt_text, response_texts = render(tokenizer, record["prompt"], responses, (source, row), fields,
                                         record.get("tools"))
    texts = [prompt_text, *response_texts]
    if "short_prompt" in record:
        short_text, short_responses = render(tokenizer, record["short_prompt"], responses, (source, row), fields,
                                             record.get("tools"))
        texts += [short_text, *short_responses]
    harmful = "harmful_completion" in record
    if harmful:  # the compliant answer as the assistant turn, and its content alone (where the turn's end starts)
        texts += [*render(tokenizer, record["prompt"], [record["harmful_completion"]], (source, row),
                          ["harmful_completion"], record.get("tools"))[1], record["harmful_completion"]]
    return texts, _Plan(fields, short="short_prompt" in record, pair=shape == "pairs", harmful=harmful)


def _is_text(record: dict, shape: str) -> bool:
    return shape == "sft" and fields_of(record, shape) == ("text",)


def _is_chat(record: dict, shape: str) -> bool:
    return shape == "chat" or shape == "sft" and fields_of(record, shape) == SHAPES["chat"]


def assemble(record: dict, plan: _Plan, ids: list[list[int]], max_length: int,
             max_prompt_length: int | None = None) -> TokenizedExample:
    """A record's example from the token ids of its texts (render_record's order): truncation and the checks."""
    source, row = record.get("_source", "<memory>"), record.get("_row")
    if plan.trained is not None:
        return _assemble_chat(source, row, plan, ids, max_length, max_prompt_length)
    if plan.text:
        if len(ids[0]) < 2:
            raise DataError(source, row, "text", "tokenizes to fewer than 2 tokens: nothing to predict")
        return TokenizedExample(ids[0][:1], [ids[0][1:max_length]], source, row)
    prompt_ids = ids[0]
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        prompt_ids = prompt_ids[-max_prompt_length:]
    if len(prompt_ids) >= max_length:
        raise DataError(source, row, "prompt", f"prompt is {len(prompt_ids)} tokens, not shorter than max_length "
                        f"{max_length}", hint="raise max_length, set max_prompt_length, or set on_bad_record: skip")
    room = max_length - len(prompt_ids)
    k = len(plan.fields)
    response_ids = []
    for response, name in zip(ids[1:1 + k], plan.fields):
        if not response:
            raise DataError(source, row, name, "response tokenizes to zero tokens")
        response_ids.append(response[:room])
    if plan.pair and response_ids[0] == response_ids[1]:
        raise DataError(source, row, "rejected", "identical to chosen after templating and tokenisation: the pair "
                        "carries no training signal")
    extras = {key: record[key] for key in ("label", "scores", "margin", "other_rewards") if key in record}
    if plan.short:  # LongPO: the reference reads the same responses after the short context
        short = [t[:len(r)] for t, r in zip(ids[2 + k:], response_ids)]
        if short != response_ids:
            raise DataError(source, row, "short_prompt", "the responses tokenize differently after the short prompt "
                            "than after the long one; the reference must score the same tokens")
        extras["short_prompt"] = ids[1 + k]
    if plan.harmful:  # its tokens as the assistant turn, up to the turn's end (recovery examples, prefill attacks)
        extras["harmful_ids"] = ids[-2][:len(ids[-1])]
    return TokenizedExample(prompt_ids, response_ids, source, row, extras)


def _assemble_chat(source: str, row, plan: _Plan, ids: list[list[int]], max_length: int,
                   max_prompt_length: int | None) -> TokenizedExample:
    """A conversation -> one example: prompt = the turns before the first assistant turn (with its generation
    prompt), response = the rest, masked to the assistant turns. Truncation as for any example."""
    prompt_ids = [] if plan.trained[0] else ids[0]
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
    for piece, trained in zip(ids[1:], plan.trained[1:]):
        response_ids += piece
        loss_mask += [trained] * len(piece)
    room = max_length - len(prompt_ids)
    response_ids, loss_mask = response_ids[:room], loss_mask[:room]
    if not any(loss_mask):
        raise DataError(source, row, "messages", "the assistant turns tokenize to zero tokens")
    while not loss_mask[-1]:  # untrained tokens at the end (a turn cut by truncation) would only cost compute
        response_ids.pop()
        loss_mask.pop()
    return TokenizedExample(prompt_ids, [response_ids], source, row, response_loss_masks=[loss_mask])


def tokenize_record(tokenizer, record: dict, shape: str, max_length: int,
                    max_prompt_length: int | None = None) -> TokenizedExample:
    texts, plan = render_record(tokenizer, record, shape)
    return assemble(record, plan, encode_texts(tokenizer, texts), max_length, max_prompt_length)


def tokenize_batch(tokenizer, records: list[dict], shape: str, max_length: int,
                   max_prompt_length: int | None = None) -> list[TokenizedExample | DataError]:
    """Each record's example, or the DataError that stops it, with every record's texts encoded in one call."""
    plans: list[tuple[int, int, _Plan] | DataError] = []
    texts: list[str] = []
    for record in records:
        try:
            record_texts, plan = render_record(tokenizer, record, shape)
        except DataError as err:
            plans.append(err)
            continue
        plans.append((len(texts), len(record_texts), plan))
        texts += record_texts
    ids = encode_texts(tokenizer, texts)
    out: list[TokenizedExample | DataError] = []
    for record, planned in zip(records, plans):
        if isinstance(planned, DataError):
            out.append(planned)
            continue
        start, n, plan = planned
        try:
            out.append(assemble(record, plan, ids[start:start + n], max_length, max_prompt_length))
        except DataError as err:
            out.append(err)
    return out


BATCH_RECORDS = 1000  # records rendered and encoded per tokenizer call: long enough for the Rust encoder's threads


def tokenize_stream(tokenizer, records: Iterable[dict], settings: ExampleSettings,
                    progress: bool = False) -> Iterator[TokenizedExample]:
    """The records' examples, BATCH_RECORDS at a time, never holding more records than that. With
    on_bad_record='skip', records that cannot fit are dropped, counted and logged at the end; none left is an error.
    progress: a progress bar (rich) over the records."""
    kept, bad, first_source = 0, [], None
    for chunk in _chunks(_with_progress(records, progress), BATCH_RECORDS):
        first_source = first_source or chunk[0].get("_source", "<memory>")
        for result in tokenize_batch(tokenizer, chunk, settings.shape, settings.max_length,
                                     settings.max_prompt_length):
            if isinstance(result, DataError):
                if settings.on_bad_record != "skip":
                    raise result
                bad.append(str(result))
            else:
                kept += 1
                yield result
    if bad:
        logging.getLogger("alignkit.data").warning("skipped %d record(s) at tokenisation; first: %s", len(bad), bad[:5])
    if not kept:
        raise DataError(first_source or "<memory>", None, None, "no usable records after tokenisation")


def tokenize_records(tokenizer, records: Iterable[dict], settings: ExampleSettings) -> list[TokenizedExample]:
    return list(tokenize_stream(tokenizer, records, settings))


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def _with_progress(records: Iterable, show: bool):
    total = len(records) if isinstance(records, Sized) else None
    if not show or total is not None and total < 1000:
        yield from records
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("tokenising"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  transient=True) as bar:
        task = bar.add_task("tokenising", total=total)
        for i, record in enumerate(records, start=1):
            yield record
            if i % 1000 == 0:
                bar.update(task, completed=i)
